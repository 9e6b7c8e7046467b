"""Export on tiny real models: adapter GGUF checked in llama.cpp, merge, HF->GGUF, quantize, scratch."""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest
from trainer_tiny import LINES, tiny_data, tiny_hf, tiny_trained  # noqa: F401

from hublab.cli import main as hublab_main
from hublab.runtime.engine.hostcpu import load_llama
from hublab.trainer import export as E


@pytest.fixture(scope="module")
def tiny_base_gguf(tiny_hf, tmp_path_factory):  # noqa: F811
    return E.convert_gguf(tiny_hf, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", outtype="f32")


def _llama_logits(llm, tokens):
    import llama_cpp

    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    llm.eval(tokens)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_adapter_gguf_matches_peft_in_llama_cpp(tiny_trained, tiny_base_gguf, tmp_path, outtype):  # noqa: F811
    import llama_cpp
    import torch
    from gguf import GGUFReader
    from hublab.trainer.lora import load_with_adapter

    result, _ = tiny_trained
    out = E.export_adapter(result.adapter_dir, tmp_path / "expert.gguf", outtype, base_gguf=tiny_base_gguf)
    reader = GGUFReader(out)
    fields = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8)  # ne order: [n_in, rank]
    assert shapes["blk.1.ffn_down.weight.lora_b"] == (8, 64)  # [rank, n_out]
    assert len(shapes) == 2 * 7 * 2
    assert (tmp_path / "expert.Modelfile").read_text().startswith("FROM ")

    # The adapter must move llama.cpp's logits the way peft moves the HF model's.
    model, tok, _ = load_with_adapter(result.adapter_dir)
    ids = tok("Python lists grow with", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with model.disable_adapter():
            hf_base = model(input_ids=ids).logits[0, -1].numpy()
        hf_tuned = model(input_ids=ids).logits[0, -1].numpy()
    llm = load_llama(tiny_base_gguf, n_ctx=64, verbose=False)
    tokens = ids[0].tolist()
    cpp_base = _llama_logits(llm, tokens)
    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(out).encode())
    assert adapter
    llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                      (ctypes.c_float * 1)(1.0))
    cpp_tuned = _llama_logits(llm, tokens)
    llm.close()
    assert np.abs(cpp_base - hf_base).max() < 1e-2  # the converted base is the same model
    delta_hf, delta_cpp = hf_tuned - hf_base, cpp_tuned - cpp_base
    assert np.abs(delta_hf).max() > 1e-3
    assert np.corrcoef(delta_hf, delta_cpp)[0, 1] > 0.98


def test_merge_convert_quantize_and_generate(tiny_trained, tiny_hf, tmp_path):  # noqa: F811

    result, _ = tiny_trained
    merged = E.merge(result.adapter_dir, tmp_path / "merged", dtype="float32")
    assert (merged / "tokenizer.model").exists()
    f16 = E.convert_gguf(merged, tmp_path / "merged-f16.gguf")
    # the chat template training rendered with is the one the GGUF carries (runtime/chat.py defines it once)
    from transformers import AutoTokenizer

    from hublab.runtime.engine.memory import read_gguf

    trained_with = AutoTokenizer.from_pretrained(result.adapter_dir).chat_template
    assert trained_with and read_gguf(f16).chat_template == trained_with
    imatrix = E.compute_imatrix(merged, LINES)
    assert imatrix["blk.0.attn_q.weight"].shape == (64,) and (imatrix["blk.0.ffn_down.weight"] > 0).all()
    paths = E.quantize(f16, tmp_path / "q", ["Q8_0", "Q4_K_M", "IQ2_XXS"], imatrix=imatrix)
    assert [p.name for p in paths] == ["merged-q8_0.gguf", "merged-q4_k_m.gguf", "merged-iq2_xxs.gguf"]
    assert paths[0].stat().st_size < f16.stat().st_size
    for p in paths:
        assert p.with_suffix(".md").read_text().startswith(f"# {p.stem}")
        assert p.with_suffix(".Modelfile").read_text().startswith(f"FROM ./{p.name}")
    llm = load_llama(paths[0], n_ctx=64, verbose=False)
    out = llm("Python lists", max_tokens=6, temperature=0)
    llm.close()
    assert out["usage"]["completion_tokens"] > 0


def test_quantize_errors_are_one_line(tmp_path, capsys):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x")
    assert hublab_main(["export", "quantize", str(src), "--types", "Q4_K_M,Q9_X"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hublab: error: --types: unknown Q9_X") and "\n" not in err
    with pytest.raises(E.ExportError, match="IQ2_XXS needs an importance matrix"):
        E.quantize(src, tmp_path, ["IQ2_XXS"])
    assert hublab_main(["export", "adapter", str(tmp_path), "-o", str(tmp_path / "a.gguf")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err


def test_scratch_trains_a_tiny_model_that_converts(tiny_data, tmp_path, capsys):  # noqa: F811
    rc = hublab_main(["train", "scratch", "--arch", "tiny", "--data", str(tiny_data / "text.jsonl"),
                      "-o", str(tmp_path / "s"), "--max-steps", "6", "--batch-size", "4", "--vocab-size", "320",
                      "--lr", "0.01"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 6
    model_dir = tmp_path / "s" / "model"
    assert (model_dir / "tokenizer.model").exists() and (model_dir / "config.json").exists()
    hist = json.loads((tmp_path / "s" / "train.json").read_text())["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    gguf = E.convert_gguf(model_dir, tmp_path / "s.gguf")
    assert gguf.stat().st_size > 10_000


def test_train_on_a_gguf_base(tiny_base_gguf, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    from hublab.trainer import lora
    from hublab.trainer.data import DataSpec

    monkeypatch.setattr(lora, "CACHE_DIR", tmp_path / "cache")
    cfg = lora.TrainConfig(base=str(tiny_base_gguf), output=tmp_path / "run", data=[DataSpec(tiny_data / "qa.jsonl")],
                           max_steps=2, batch_size=4, max_seq_len=64, eval_fraction=0.0, lr=0.01)
    result = lora.train_lora(cfg)
    cached = list((tmp_path / "cache" / "hf").iterdir())
    assert result.steps == 2 and len(cached) == 1 and (cached[0] / "config.json").exists()
    # the adapter exports against the GGUF it was trained on
    out = E.export_adapter(result.adapter_dir, tmp_path / "a.gguf", "f16", base_gguf=tiny_base_gguf)
    assert out.stat().st_size > 1000


def test_export_profiles_builds_one_package_each_board_installs_its_variant(tiny_base_gguf, tmp_path, capsys,
                                                                              monkeypatch):
    from hublab.runtime import pkg
    from hublab.runtime.config import scan_models
    from hublab.runtime.engine.profiles import board_profiles

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no default signing key
    key = tmp_path / "signing.key"
    public = pkg.keygen(key)["public_key"]
    out = tmp_path / "tiny-pkg"
    rc = hublab_main(["export", "profiles", str(tiny_base_gguf), "--profiles", "pi-zero-2w,pi5-8gb",
                      "-o", str(out), "--name", "tiny", "--version", "2.0", "--key", str(key)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    boards = board_profiles()
    chosen = json.loads((out / "profiles.json").read_text())
    assert chosen == report["boards"]
    for name in ("pi-zero-2w", "pi5-8gb"):
        assert chosen[name]["type"] == boards[name].preferred_quants[0].upper()
        assert (out / chosen[name]["file"]).exists()
        assert (out / chosen[name]["variant"] / "tiny.toml").exists()
    assert report["package"]["signed_by"] == public
    assert sorted(report["package"]["variants"]) == sorted({c["variant"] for c in chosen.values()})
    assert not (out / ".quantize").exists()

    # The package installs on each board with the variant export chose for it, and the model is there.
    registry = tmp_path / "registry"
    pkg.publish(out, registry)
    for name in ("pi-zero-2w", "pi5-8gb"):
        models = tmp_path / f"models-{name}"
        r = pkg.install("tiny:2.0", registry, models_dir=models, profile=name, trusted_keys=[public])
        assert r.variant == chosen[name]["variant"]
        catalog = scan_models(models)
        assert "tiny" in catalog.models and Path(catalog.models["tiny"].path).exists()

    assert hublab_main(["export", "profiles", str(tiny_base_gguf), "--profiles", "pi9", "-o", str(tmp_path)]) == 1
    assert "unknown pi9" in capsys.readouterr().err


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_training_goes_on_from_an_adapter_gguf(tiny_trained, tiny_hf, tiny_data, tmp_path, outtype):  # noqa: F811
    """init_adapter: a shipped expert's GGUF (what export_adapter wrote, q/k rows in llama.cpp's rotary order)
    loads back into a fresh LoRA as the weights peft trained; another rank or a model GGUF is a one-line error."""
    from safetensors.torch import load_file

    from hublab.trainer import lora

    result, _ = tiny_trained
    gguf = E.export_adapter(result.adapter_dir, tmp_path / "expert.gguf", outtype, card=False)
    trained = load_file(result.adapter_dir / "adapter_model.safetensors")
    cfg = lora.TrainConfig(base=str(tiny_hf), output=tmp_path / "run")
    model = lora.add_lora(lora.load_base(cfg.base)[0], cfg)
    lora.start_from(model, gguf, cfg.lora_r)
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(state) == set(trained) and len(trained) == 2 * 7 * 2
    for name, weight in trained.items():  # q8_0 keeps 8 bits a weight, per block of 32
        assert (state[name] - weight).abs().max() <= (1e-6 if outtype == "f32" else 0.01) * weight.abs().max(), name
    # a run from the TOML starts there: one step at a negligible rate leaves the adapter where it was
    (tmp_path / "go_on.toml").write_text(
        f'[train]\nbase = "{tiny_hf}"\noutput = "run2"\nmax_steps = 1\nbatch_size = 2\nmax_seq_len = 64\n'
        f'lr = 1e-9\nwarmup_steps = 0\neval_fraction = 0.0\n[lora]\nr = 8\nalpha = 16\ninit = "expert.gguf"\n'
        f'[[data]]\npath = "{tiny_data / "qa.jsonl"}"\n')
    from hublab.trainer.train import expert

    again = load_file(expert(tmp_path / "go_on.toml").adapter_dir / "adapter_model.safetensors")
    for name, weight in trained.items():
        key = next(k for k in again if k.replace(".default", "") == name)
        assert (again[key] - weight).abs().max() <= (1e-5 if outtype == "f32" else 0.01) * weight.abs().max(), name
    with pytest.raises(E.ExportError, match=r"rank 8, but the run trains at lora_r = 4; set \[lora\] r = 8"):
        lora.start_from(lora.add_lora(lora.load_base(cfg.base)[0], lora.TrainConfig(cfg.base, cfg.output, lora_r=4)),
                        gguf, 4)
    base_gguf = E.convert_gguf(tiny_hf, tmp_path / "base.gguf", outtype="f32")
    with pytest.raises(E.ExportError, match="a model GGUF, not a LoRA adapter"):
        lora.start_from(model, base_gguf, 8)
    with pytest.raises(lora.TrainError, match="no such file"):
        lora.start_from(model, tmp_path / "missing.gguf", 8)
