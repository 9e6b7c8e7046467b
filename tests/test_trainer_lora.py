"""The LoRA loop on a tiny real Llama: train, eval, early stop, checkpoint/resume, CLI and errors."""
from __future__ import annotations

import json

import pytest
from trainer_tiny import tiny_data, tiny_hf, tiny_trained  # noqa: F401

from hublab.cli import main as hublab_main
from hublab.trainer.lora import TrainConfig, TrainError, make_loss_module
from hublab.trainer.train import load_config


def test_training_lowers_eval_loss_and_writes_outputs(tiny_trained):  # noqa: F811
    result, cfg = tiny_trained
    evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    assert result.steps == 12 and len(evals) == 3
    assert result.best_eval_loss == pytest.approx(min(evals), abs=1e-4)
    assert evals[-1] < evals[0]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    out = cfg.parent / "run"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "train.json").read_text())
    assert meta["history"][0]["tok_s"] > 0


def test_resume_continues_from_checkpoint(tiny_trained, capsys):  # noqa: F811
    _, cfg = tiny_trained
    # same run, more steps: picks up at step 12 rather than starting again
    rc = hublab_main(["train", "expert", str(cfg), "--max-steps", "14"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 14
    state = json.loads((cfg.parent / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 14 and len(state["history"]) == 14


def test_early_stopping(tiny_hf, tiny_data, tmp_path):  # noqa: F811
    from hublab.trainer.data import DataSpec
    from hublab.trainer.lora import train_lora

    # lr this high makes eval loss worse after the first evaluation
    cfg = TrainConfig(base=str(tiny_hf), output=tmp_path / "run", data=[DataSpec(tiny_data / "qa.jsonl")],
                      max_steps=40, batch_size=4, max_seq_len=64, lr=3.0, warmup_steps=1, eval_every=2,
                      patience=2, eval_fraction=0.2)
    result = train_lora(cfg)
    assert result.stopped_early and result.steps < 40


def test_gradient_accumulation_matches_one_larger_batch(tiny_hf, tmp_path):  # noqa: F811
    # Two examples with equally long responses: one batch of 2 and two accumulated micro-batches of 1
    # see the same mean gradient, so the first optimizer step must move the adapter identically (a
    # step taken after only one micro-batch, or one dropped, would not).
    from safetensors.torch import load_file

    from hublab.trainer.data import DataSpec
    from hublab.trainer.lora import train_lora

    from trainer_tiny import write_jsonl

    data = write_jsonl(tmp_path / "two.jsonl", [{"question": "Name a fox.", "response": "The quick brown fox."},
                                                {"question": "Name a dog.", "response": "The quick brown dog."}])
    weights = []
    for batch, accum in ((2, 1), (1, 2)):
        cfg = TrainConfig(base=str(tiny_hf), output=tmp_path / f"b{batch}a{accum}", data=[DataSpec(data)],
                          max_steps=1, batch_size=batch, grad_accum=accum, lr=0.01, warmup_steps=1,
                          eval_fraction=0.0, patience=0, save_every=0, max_seq_len=64)
        result = train_lora(cfg)
        assert result.steps == 1
        weights.append(load_file(result.adapter_dir / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert (weights[0][k] - weights[1][k]).abs().max() < 1e-5, k


def test_chunked_loss_matches_full_logits(tiny_hf):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf)
    ids = torch.randint(4, 300, (2, 20))
    labels = ids.clone()
    labels[:, :8] = -100
    mask = torch.ones_like(ids)
    full, n_full = make_loss_module(model, 0)(ids, labels, mask)
    chunked, n = make_loss_module(model, 7)(ids, labels, mask)
    assert int(n) == int(n_full) == 2 * 12
    assert torch.allclose(full, chunked, rtol=1e-4)


def test_qlora_needs_cuda(tiny_hf, tiny_data, tmp_path):  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tmp_path / "q.toml"
    cfg.write_text(f'[train]\nbase = "{tiny_hf}"\nqlora = true\n[[data]]\npath = "{tiny_data / "qa.jsonl"}"\n')
    with pytest.raises(TrainError, match="qlora = true needs a CUDA GPU"):
        from hublab.trainer.train import expert

        expert(cfg)


@pytest.mark.parametrize("body,message", [
    ('[train]\nbase = "x"\n', r"no \[\[data\]\] entries"),
    ('[train]\nmax_steps = 3\n[[data]]\npath = "d.jsonl"\n', "missing key base"),
    ('[train]\nbase = "x"\ntemplate = "vicuna"\n[[data]]\npath = "d.jsonl"\n', "unknown chat template 'vicuna'"),
    ('[train]\nbase = "x"\nmax_step = 3\n[[data]]\npath = "d.jsonl"\n', "did you mean 'max_steps'"),
    ('[train]\nbase = "x"\n[[data]]\npath = "d.jsonl"\nformat = "csv"\n', "expected one of"),
    ('[train]\nbase = "x"\n[lora]\ninit = "gone.gguf"\n[[data]]\npath = "d.jsonl"\n',
     r"init: .*gone.gguf not found; point it at an adapter GGUF"),
])
def test_bad_config_is_one_line(tmp_path, capsys, body, message):
    cfg = tmp_path / "e.toml"
    cfg.write_text(body)
    with pytest.raises(Exception, match=message):
        load_config(cfg)
    assert hublab_main(["train", "expert", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hublab: error: ") and "\n" not in err and str(cfg) in err


def test_bad_data_through_the_cli(tiny_hf, tmp_path, capsys):  # noqa: F811
    # fails before the run writes anything
    (tmp_path / "d.jsonl").write_text('{"question": "q", "response": "r"}\n{"question": "oops"}\n')
    cfg = tmp_path / "e.toml"
    cfg.write_text(f'[train]\nbase = "{tiny_hf}"\nmax_steps = 1\n[[data]]\npath = "d.jsonl"\n')
    assert hublab_main(["train", "expert", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"hublab: error: {tmp_path / 'd.jsonl'}:2: missing column 'response'; add it to every record"
    assert not (tmp_path / "runs").exists()


def test_train_router_delegates_to_the_router_trainer(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text('{"text": "how do I pip install"}\n')
    assert hublab_main(["train", "router", str(tmp_path / "r.jsonl"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hublab: error: {tmp_path / 'r.jsonl'}:1:") and "domain" in err
