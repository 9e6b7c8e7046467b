"""`train moe-lora` on tiny real MoE models (Qwen2-MoE with a shared expert, Mixtral): router matching,
freeze/unfreeze, aux losses against hand-computed values, data mixing, collapse prevention, merge ->
GGUF -> llama.cpp -> runtime expert, and one-line errors."""
from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import pytest
from trainer_tiny import LINES, QA, write_jsonl

from hublab.runtime.engine.hostcpu import load_llama
from hublab.trainer import data as D
from hublab.trainer.lora import TrainConfig, TrainError, train_lora
from hublab.trainer.moe_lora import (MoeSettings, RouterTraining, add_arguments, adapt, balance_entropy_loss,
                                     data_specs, load_balancing_loss, moe_lora, router_names, router_parameters,
                                     token_entropy, usage, z_loss)

LN2, LN3 = math.log(2), math.log(3)


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    """HF dirs of a tiny Qwen2-MoE (8 experts, top-2, shared expert) and a tiny Mixtral (4 experts, top-2)."""
    import torch
    from transformers import (AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM)

    from hublab.trainer.scratch import train_tokenizer

    root = tmp_path_factory.mktemp("moe")
    tok_dir = train_tokenizer(LINES * 20 + [q["question"] for q in QA], root / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                  num_experts_per_tok=2)
    torch.manual_seed(0)
    models = {
        "qwen2_moe": Qwen2MoeForCausalLM(Qwen2MoeConfig(
            **common, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
            num_experts=8, decoder_sparse_step=1, mlp_only_layers=[])),
        "mixtral": MixtralForCausalLM(MixtralConfig(**common, intermediate_size=64, num_local_experts=4)),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        (root / name / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def moe_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("moe_data")
    write_jsonl(d / "conversation.jsonl", QA)
    write_jsonl(d / "memory.jsonl", [{"text": line} for line in LINES])
    write_jsonl(d / "lines.jsonl", [{"text": line} for line in LINES] * 4)
    return d


# ---------------------------------------------------------------------------------------------------
# Aux losses against values worked out by hand

def test_load_balancing_loss_by_hand():
    import torch

    # top-1, probabilities (3/4, 1/4) and (1/4, 3/4): f = (1/2, 1/2), P = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1
    even = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    assert float(load_balancing_loss(even, top_k=1)) == pytest.approx(1.0)
    # both tokens pick expert 0: f = (1, 0), P = (3/4, 1/4) -> 2 * 3/4 = 1.5
    skewed = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    assert float(load_balancing_loss(skewed, top_k=1)) == pytest.approx(1.5)
    # a padded third token (mask 0) changes nothing, however large its logits
    padded = torch.tensor([[LN3, 0.0], [LN3, 0.0], [0.0, 50.0]])
    assert float(load_balancing_loss(padded, 1, torch.tensor([1, 1, 0]))) == pytest.approx(1.5)
    # top-2 of 3 experts; token probabilities (1/2, 1/4, 1/4) twice (logits ln2, 0, 0): expert 0 plus one
    # of the tied others per token -> f_0 = 2/4, P_0 = 1/2, and f_1 + f_2 = 1/2 with P_1 = P_2 = 1/4:
    # 3 * (1/2 * 1/2 + 1/2 * 1/4) = 9/8
    assert float(load_balancing_loss(torch.tensor([[LN2, 0.0, 0.0]] * 2), top_k=2)) == pytest.approx(9 / 8)


def test_balance_entropy_z_loss_and_token_entropy_by_hand():
    import torch

    # equal logits: mean probability uniform -> log N - H = 0; each token has entropy log 2
    flat = torch.zeros(3, 2)
    assert float(balance_entropy_loss(flat)) == pytest.approx(0.0, abs=1e-6)
    assert float(token_entropy(flat)) == pytest.approx(LN2)
    # (3/4, 1/4) for every token: H = -(3/4 ln 3/4 + 1/4 ln 1/4) = ln 4 - 3/4 ln 3
    skewed = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    h = math.log(4) - 0.75 * LN3
    assert float(balance_entropy_loss(skewed)) == pytest.approx(LN2 - h)
    assert float(token_entropy(skewed)) == pytest.approx(h)
    # z-loss: logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4 -> mean(ln2^2, 4 ln2^2) = 2.5 ln2^2
    z = torch.tensor([[0.0, 0.0], [LN3, 0.0], [9.0, 9.0]])
    assert float(z_loss(z, torch.tensor([1, 1, 0]))) == pytest.approx(2.5 * LN2 ** 2)


def test_usage_summary_by_hand():
    # 8 slots over 4 experts, capacity 1.0 * 8 / 4 = 2 per expert: 6 - 2 = 4 of 8 slots would be dropped
    u = usage([6, 2, 0, 0], capacity_factor=1.0)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert u["usage_entropy"] == pytest.approx(h / math.log(4), abs=1e-4)
    assert u["max_share"] == 0.75 and u["unused_experts"] == 2 and u["dropped_at_capacity"] == 0.5
    assert usage([2, 2, 2, 2])["usage_entropy"] == 1.0


# ---------------------------------------------------------------------------------------------------
# What is trained

def test_router_matching_excludes_shared_expert_gate(moe_models):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(moe_models["qwen2_moe"])
    names = [n for n, _ in base.named_modules()]
    assert "model.layers.0.mlp.shared_expert_gate" in names
    assert router_names(base) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    model = adapt(base, MoeSettings(train_router="lora", router_lora_r=2, expert_lora_r=4))
    trainable = {n.removeprefix("base_model.model.model."): tuple(p.shape)
                 for n, p in model.named_parameters() if p.requires_grad}
    # router LoRA at rank 2 ([2, hidden], [experts, 2]); experts' fused gate_up/down LoRA at rank 4 per expert
    assert trainable["layers.0.mlp.gate.lora_A.default.weight"] == (2, 64)
    assert trainable["layers.0.mlp.gate.lora_B.default.weight"] == (8, 2)
    assert trainable["layers.0.mlp.experts.lora_A.default.weight"] == (4 * 8, 64)  # down_proj: in = 64
    assert trainable["layers.0.mlp.experts.base_layer.lora_B.default.weight"] == (128, 4 * 8)  # gate_up: out = 128
    assert not [n for n in trainable if "shared_expert" in n or "self_attn" in n or "embed" in n]
    assert len(trainable) == 2 * 6
    full = adapt(AutoModelForCausalLM.from_pretrained(moe_models["qwen2_moe"]),
                 MoeSettings(train_router="full", expert_lora_r=4))
    routers = router_parameters(full)
    assert sorted(routers) == [f"base_model.model.model.layers.{i}.mlp.gate.modules_to_save.default.weight"
                               for i in (0, 1)]
    assert not any("shared_expert_gate" in n for n, p in full.named_parameters() if p.requires_grad)


def test_router_frozen_then_trained(moe_models, moe_data, tmp_path):
    """Router weights bit-identical for the first N steps, changed after; its layer-0 routing with them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(moe_models["qwen2_moe"])
    items = D.encode_all(D.load_examples(D.DataSpec(moe_data / "memory.jsonl")), tok, D.TEMPLATES["alpaca"], 32)
    seen = []

    class Recording(RouterTraining):
        def _before_step(self, model, step):
            seen.append({n: p.detach().clone() for n, p in router_parameters(model).items()})
            super()._before_step(model, step)

    hooks = Recording(MoeSettings(train_router="full", expert_lora_r=2, router_freeze_steps=2), items,
                      tok.pad_token_id, log=lambda _: None)
    cfg = TrainConfig(base=str(moe_models["qwen2_moe"]), output=tmp_path / "run",
                      data=[D.DataSpec(moe_data / "lines.jsonl")], max_steps=4, batch_size=2, max_seq_len=32,
                      lr=0.05, warmup_steps=1, eval_fraction=0.0, save_every=0, lora_r=2)
    train_lora(cfg, hooks)
    assert len(seen) == 4 and len(seen[0]) == 2  # before steps 1..4: after 0, 1, 2, 3 updates
    for name in seen[0]:
        assert seen[1][name].equal(seen[0][name]) and seen[2][name].equal(seen[0][name])
        assert not seen[3][name].equal(seen[2][name])
    before, unfreeze = hooks.snapshots["before"], hooks.snapshots["unfreeze"]
    assert before["layers"][0]["counts"] == unfreeze["layers"][0]["counts"]
    assert sum(before["layers"][0]["counts"]) == 2 * before["tokens"]


def test_gradient_checkpointing_trains_the_same(moe_models, moe_data, tmp_path):
    # the gates run again in backward under checkpointing; the aux losses must see one forward's logits
    runs = []
    for gc in (False, True):
        r = moe_lora(str(moe_models["qwen2_moe"]), tmp_path / f"gc{gc}", conversation_data=moe_data / "lines.jsonl",
                     router_aux_loss_coef=0.5, entropy_coef=0.5, z_loss_coef=0.01, max_steps=3, batch_size=2,
                     grad_accum=2, lr=0.05, max_seq_len=32, eval_fraction=0.0, save_every=0, warmup_steps=1,
                     gguf=False, gradient_checkpointing=gc, log=lambda _: None)
        runs.append(r)
    a, b = runs
    assert [h["loss"] for h in a.train.history] == pytest.approx([h["loss"] for h in b.train.history], abs=1e-4)
    assert a.snapshots["end"]["layers"][1]["counts"] == b.snapshots["end"]["layers"][1]["counts"]


# ---------------------------------------------------------------------------------------------------
# Data

def test_conversation_memory_mix_is_80_20(moe_data):
    specs = data_specs(moe_data / "conversation.jsonl", moe_data / "memory.jsonl", 0.8, 0.2)
    train, _ = D.load_mix(specs, eval_fraction=0.0, seed=0, total=50)
    sources = Counter(Path(e.source.rsplit(":", 1)[0]).name for e in train)
    assert sources == {"conversation.jsonl": 40, "memory.jsonl": 10}


def test_seed_flags_and_dashed_flags_parse_alike():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    seed = parser.parse_args(["--base", "b", "-o", "o", "--data", "c.jsonl", "--memory_data", "m.jsonl",
                              "--conversation_ratio", "0.7", "--memory_ratio", "0.3", "--router_lora_r", "2",
                              "--expert_lora_r", "3", "--router_aux_loss_coef", "0.05", "--router_freeze_steps", "5"])
    dashed = parser.parse_args(["--base", "b", "-o", "o", "--conversation-data", "c.jsonl", "--memory-data", "m.jsonl",
                                "--conversation-ratio", "0.7", "--memory-ratio", "0.3", "--router-lora-r", "2",
                                "--expert-lora-r", "3", "--router-aux-loss-coef", "0.05", "--router-freeze-steps", "5"])
    assert vars(seed) == vars(dashed)
    assert seed.conversation_data == [Path("c.jsonl")] and seed.router_freeze_steps == 5
    extra = parser.parse_args(["--base", "b", "-o", "o", "--entropy-coef", "0.1", "--z-loss-coef", "0.01",
                               "--train-router", "full"])
    assert (extra.entropy_coef, extra.z_loss_coef, extra.train_router) == (0.1, 0.01, "full")


# ---------------------------------------------------------------------------------------------------
# The aux losses keep a router from collapsing

def test_aux_losses_prevent_router_collapse(moe_models, moe_data, tmp_path):
    # a high learning rate on fully trained routers collapses them within 30 steps without aux losses
    runs = {}
    for tag, coefs in (("off", (0.0, 0.0, 0.0)), ("on", (0.5, 0.5, 0.001))):
        r = moe_lora(str(moe_models["qwen2_moe"]), tmp_path / tag, conversation_data=moe_data / "lines.jsonl",
                     train_router="full", expert_lora_r=1, router_aux_loss_coef=coefs[0], entropy_coef=coefs[1],
                     z_loss_coef=coefs[2], max_steps=30, batch_size=4, grad_accum=1, lr=0.02, max_seq_len=32,
                     eval_fraction=0.0, save_every=0, warmup_steps=1, gguf=False, log=lambda _: None)
        runs[tag] = r.snapshots
    before = runs["off"]["before"]["usage_entropy"]
    off, on = runs["off"]["end"], runs["on"]["end"]
    print(f"usage entropy before {before}, end without aux {off['usage_entropy']}, with aux {on['usage_entropy']}")
    assert before > 0.95
    assert off["usage_entropy"] < 0.88 and any(layer["unused_experts"] for layer in off["layers"])
    assert on["usage_entropy"] > 0.97 and not any(layer["unused_experts"] for layer in on["layers"])


# ---------------------------------------------------------------------------------------------------
# Merge -> GGUF -> llama.cpp -> runtime

def test_merge_convert_and_run_as_runtime_expert(moe_models, moe_data, tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    from hublab.runtime.engine.runtime import Runtime

    r = moe_lora(str(moe_models["mixtral"]), tmp_path / "mix", conversation_data=moe_data / "conversation.jsonl",
                 memory_data=moe_data / "memory.jsonl", router_freeze_steps=2, max_steps=4, batch_size=2, grad_accum=1,
                 lr=0.05, max_seq_len=48, eval_fraction=0.0, save_every=0, warmup_steps=1, name="mixmoe",
                 log=lambda _: None)
    # the expert LoRA (target_parameters) and router LoRA are folded into the saved weights
    base = load_file(moe_models["mixtral"] / "model.safetensors")
    merged = load_file(r.merged_dir / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert not torch.allclose(base[key], merged[key])
    assert not torch.equal(base["model.layers.1.block_sparse_moe.gate.weight"],
                           merged["model.layers.1.block_sparse_moe.gate.weight"])
    assert torch.equal(base["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"])
    report = json.loads(r.routing_json.read_text())
    assert list(report["snapshots"]) == ["before", "unfreeze", "end"] and report["aux_history"]
    assert r.gguf.name == "mixmoe-q8_0.gguf"
    llm = load_llama(r.gguf, n_ctx=64, n_threads=1, verbose=False)
    assert llm.metadata["general.architecture"] == "llama" and llm.metadata["llama.expert_count"] == "4"
    assert llm("Python lists", max_tokens=6, temperature=0)["usage"]["completion_tokens"] > 0
    llm.close()
    with Runtime(models_dir=r.model_toml.parent, profile="host", threads=1) as rt:
        assert rt.config("mixmoe").type == "expert"
        out = rt.generate("mixmoe", "Python lists", raw=True, max_tokens=6)
        assert out.tokens > 0


def test_qwen2_moe_with_tied_head_converts_and_runs(moe_models, moe_data, tmp_path):
    """The tiny Qwen2-MoE ties its head and has a sentencepiece tokenizer: export writes the head out
    and takes moe-init's converter route; llama.cpp's qwen2moe loads it (shared expert included)."""

    from hublab.runtime.engine.runtime import Runtime

    r = moe_lora(str(moe_models["qwen2_moe"]), tmp_path / "q", conversation_data=moe_data / "memory.jsonl",
                 max_steps=1, batch_size=2, max_seq_len=32, eval_fraction=0.0, save_every=0, name="qmoe",
                 log=lambda _: None)
    llm = load_llama(r.gguf, n_ctx=64, n_threads=1, verbose=False)
    assert llm.metadata["general.architecture"] == "qwen2moe"
    assert llm.metadata["qwen2moe.expert_count"] == "8" and "qwen2moe.expert_shared_feed_forward_length" in llm.metadata
    assert llm("Python lists", max_tokens=6, temperature=0)["usage"]["completion_tokens"] > 0
    llm.close()
    with Runtime(models_dir=r.model_toml.parent, profile="host", threads=1) as rt:
        assert rt.generate("qmoe", "Python lists", raw=True, max_tokens=6).tokens > 0


def test_qwen2_moe_gguf_refusal_says_why(moe_models, moe_data, tmp_path):
    """Without tokenizer.model the plain converter reads the BPE tokenizer.json, whose pre-tokenizer it
    does not know: one line saying why and what to do, the merged HF model kept."""
    import shutil

    from hublab.trainer.export import ExportError

    base = tmp_path / "base"
    shutil.copytree(moe_models["qwen2_moe"], base, ignore=shutil.ignore_patterns("tokenizer.model"))
    with pytest.raises(ExportError, match="Qwen2-MoE converter reads only a GPT-2 style BPE tokenizer") as exc:
        moe_lora(str(base), tmp_path / "q", conversation_data=moe_data / "memory.jsonl",
                 max_steps=1, batch_size=2, max_seq_len=32, eval_fraction=0.0, save_every=0, log=lambda _: None)
    assert "\n" not in str(exc.value) and "tokenizer.model" in str(exc.value)
    assert (tmp_path / "q" / "merged" / "config.json").exists()  # the merged HF model is kept


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming the flag or file and the fix, before anything is written

@pytest.mark.parametrize("kwargs,message", [
    ({"memory_ratio": -0.2}, r"--memory_ratio -0.2: must be a number >= 0"),
    ({"conversation_data": None, "memory_data": "MEM"}, "--memory-data needs --conversation-data"),
    ({"router_freeze_steps": 10, "max_steps": 10}, r"--router_freeze_steps 10 >= --max-steps 10"),
    ({"train_router": "full", "expert_lora_r": 0}, "--train-router full with --expert_lora_r 0"),
    ({"z_loss_coef": -1.0}, r"--z-loss-coef -1.0: must be >= 0"),
    ({"quant": "Q9_9"}, "--quant 'Q9_9': unknown"),
    ({"conversation_data": "MISSING"}, "missing.jsonl: file not found"),
    ({"base": "DENSE"}, "has no MoE router"),
])
def test_bad_input_is_one_line(moe_models, moe_data, tmp_path, kwargs, message):
    from hublab.trainer.scratch import init_model

    kw = {"conversation_data": moe_data / "conversation.jsonl", "base": str(moe_models["mixtral"]), **kwargs}
    if kw.get("memory_data") == "MEM":
        kw["memory_data"] = moe_data / "memory.jsonl"
    if kw["conversation_data"] == "MISSING":
        kw["conversation_data"] = tmp_path / "missing.jsonl"
    if kw["base"] == "DENSE":
        kw["base"] = str(init_model("tiny", moe_models["mixtral"], tmp_path / "dense"))
    base = kw.pop("base")
    with pytest.raises((TrainError, D.DataError), match=message) as exc:
        moe_lora(base, tmp_path / "out", max_steps=kw.pop("max_steps", 2), log=lambda _: None, **kw)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_resume_with_other_adapter_shapes_is_refused(moe_models, moe_data, tmp_path):
    kw = dict(conversation_data=moe_data / "memory.jsonl", batch_size=2, max_seq_len=32, eval_fraction=0.0,
              save_every=0, gguf=False, log=lambda _: None)
    moe_lora(str(moe_models["mixtral"]), tmp_path / "run", max_steps=1, router_lora_r=2, **kw)
    with pytest.raises(TrainError, match=r"run/checkpoint: was trained with other adapter shapes "
                                         r"\(--router_lora_r 2 -> 4\); give the same values to resume, or --no-resume"):
        moe_lora(str(moe_models["mixtral"]), tmp_path / "run", max_steps=2, router_lora_r=4, **kw)
    r = moe_lora(str(moe_models["mixtral"]), tmp_path / "run", max_steps=2, router_lora_r=2, **kw)
    assert r.train.steps == 2 and list(r.snapshots) == ["before", "end"]
