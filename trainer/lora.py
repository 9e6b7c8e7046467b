"""LoRA / QLoRA fine-tuning: one readable loop.

load base (HF dir or GGUF, dequantised and cached) -> wrap with peft LoRA -> stream padded batches ->
loss on response tokens only (chunked cross-entropy: logits are computed only for response positions,
a few hundred rows of the 262k-token gemma vocabulary at a time) -> AdamW + warmup/cosine -> eval,
early stopping, checkpoints, loss-curve PNG.

The loop runs through `accelerate`, so the same code trains on CPU, on one GPU (bf16 autocast) and on
several GPUs when started with `accelerate launch` or `torchrun` (DDP, FSDP or DeepSpeed as configured
there). DeepSpeed ZeRO-3 (the `deepspeed` extra) shards parameters, gradients and optimizer state:

    accelerate launch --use_deepspeed --deepspeed_config_file trainer/deepspeed_zero3.json \
        -m hublab.trainer.train expert CONFIG.toml

Under ZeRO-3 the weights are gathered before each save and checkpoints go through accelerate's
save_state (each rank writes its own optimizer shard).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hublab.runtime.errors import HublabError
from hublab.runtime.paths import cache_home

from . import data as D

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# $HUBLAB_CACHE, else the cache home ($HUBLAB_HOME/cache or ~/.cache/hublab)
CACHE_DIR = Path(os.environ.get("HUBLAB_CACHE") or cache_home())


class TrainError(HublabError, ValueError):
    """Training cannot start or go on; the message says why and what to change."""


@dataclass
class TrainConfig:
    """Everything one LoRA run needs; a TOML [train]/[lora]/[[data]] file maps onto it one to one."""
    base: str
    output: Path
    data: list[D.DataSpec] = field(default_factory=list)
    template: str = "auto"
    max_seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 200
    epochs: float = 0.0  # > 0: train this many passes over the data instead of max_steps
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    eval_every: int = 25
    patience: int = 3  # evaluations without improvement before stopping; 0 = never stop early
    save_every: int = 50
    seed: int = 0
    resume: bool = True
    qlora: bool = False
    gradient_checkpointing: bool = False
    ce_chunk: int = 256  # response rows per cross-entropy chunk; 0 = full logits through the HF head
    threads: int = 0
    log_every: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    mix_total: int = 0  # examples per pass of a ratio mix; 0 = the datasets' combined size
    time_limit: float = 0.0  # seconds of training after which to evaluate once more and stop; 0 = none
    init_adapter: str = ""   # start from this adapter (a llama.cpp LoRA GGUF or a peft directory), not from zero


@dataclass
class TrainHooks:
    """Optional extension points for loops built on train_lora (the MoE router trainer uses them)."""
    adapt: "object | None" = None         # (model, cfg) -> model, instead of add_lora
    extra_loss: "object | None" = None    # () -> scalar tensor added to each micro-batch's loss
    before_step: "object | None" = None   # (model, step) -> None, before each optimizer step


@dataclass
class TrainResult:
    output: Path
    adapter_dir: Path
    steps: int
    best_eval_loss: float | None
    train_loss: float
    tokens_per_s: float
    seconds: float
    stopped_early: bool
    history: list[dict]
    planned_steps: int = 0   # the steps the epochs (or max_steps) asked for; fewer ran when a limit stopped it


# ---------------------------------------------------------------------------------------------------
# Base model

def resolve_base(spec: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for an HF model dir, a .gguf file, `pypi:<pkg>` or a model name."""
    from hublab.runtime import config as C

    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return p, ggufs[0].name
            raise TrainError(f"base {spec}: directory has no config.json; point base at an HF model dir or a .gguf")
        return p, None
    if p.suffix == ".gguf":
        if not p.exists():
            raise TrainError(f"base {spec}: file not found; fix the path")
        return p.parent, p.name
    try:
        if spec.startswith("pypi:"):
            g = C.pypi_model_path(spec[5:])
            return g.parent, g.name
        catalog = C.scan_models(C.EMBEDDED_MODELS_DIR)
    except FileNotFoundError as exc:
        raise TrainError(f"base {spec}: {exc}") from None
    if spec in catalog.models and catalog.models[spec].path:
        g = Path(catalog.models[spec].path)
        return g.parent, g.name
    raise TrainError(f"base {spec!r}: not a directory, a .gguf file or a model in {C.EMBEDDED_MODELS_DIR}; "
                     "give an HF model dir, a GGUF path or a base model name")


def dequantized_dir(directory: Path, gguf_file: str) -> Path:
    """An HF copy of a GGUF (dequantised once by transformers, cached): later loads take seconds, not a minute."""
    src = directory / gguf_file
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = CACHE_DIR / "hf" / f"{src.stem}-{key}"
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantising {src.name} for training (once; cached in {out})", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise TrainError(f"{src}: transformers cannot load this GGUF ({str(exc).splitlines()[0][:160]}); "
                         "use an HF model directory as base") from None
    # A GGUF-loaded model refuses save_pretrained while it carries the GGUF quantizer marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def require_bitsandbytes(flag: str) -> None:
    """TrainError naming `flag` unless bitsandbytes imports (quantized training, CUDA hosts only)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainError(f"{flag} needs bitsandbytes; run: pip install bitsandbytes") from None


def base_tokenizer(spec: str):
    """(tokenizer, model_dir) for a base spec (HF dir or GGUF, dequantised once); the tokenizer pads
    with end-of-sequence when it has no pad token."""
    from transformers import AutoTokenizer

    directory, gguf = resolve_base(spec)
    model_dir = dequantized_dir(directory, gguf) if gguf else directory
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model_dir


def load_pretrained(spec: str, **kwargs):
    """(model, tokenizer, model_dir) for a base spec, the model loaded with from_pretrained `kwargs`."""
    from transformers import AutoModelForCausalLM

    tok, model_dir = base_tokenizer(spec)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs), tok, model_dir


def load_base(spec: str, qlora: bool = False, device: str = "cpu"):
    """(model, tokenizer, model_dir) for a base spec; QLoRA loads 4-bit NF4 weights (CUDA only)."""
    import torch

    kwargs: dict = {"dtype": torch.float32}
    if qlora:
        if not device.startswith("cuda"):
            raise TrainError("qlora = true needs a CUDA GPU (bitsandbytes 4-bit); set qlora = false to train LoRA here")
        require_bitsandbytes("qlora = true")
        from transformers import BitsAndBytesConfig

        kwargs = {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True), "device_map": {"": device}}
    return load_pretrained(spec, **kwargs)


def add_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = "all-linear" if cfg.lora_targets == ["all-linear"] else [t for t in cfg.lora_targets if t in names]
    if not targets:
        raise TrainError(f"[lora] targets: none of {cfg.lora_targets} is a module of this model; "
                         f"use names such as {', '.join(sorted(n for n in names if n.endswith('proj'))[:8])}")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, lcfg)


def start_from(model, adapter: Path, r: int) -> None:
    """Load an adapter's weights into the fresh LoRA of `model`: a llama.cpp adapter GGUF (a shipped expert, to go
    on training it) or a peft directory. Every LoRA tensor of the model must be given, and nothing else."""
    from peft import set_peft_model_state_dict

    if adapter.is_dir():
        from safetensors.torch import load_file

        weights = adapter / "adapter_model.safetensors"
        if not weights.is_file():
            raise TrainError(f"init_adapter {adapter}: no adapter_model.safetensors; point it at a peft adapter "
                             "directory or an adapter GGUF")
        state = load_file(weights)
    elif adapter.is_file():
        from .export import read_adapter

        config = model.config
        state = read_adapter(adapter, r, config.num_attention_heads,
                             getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    else:
        raise TrainError(f"init_adapter {adapter}: no such file or directory")
    wanted = {k.replace(".default", "") for k in model.state_dict() if "lora_" in k}
    given = set(state)
    if wanted != given:
        missing, extra = sorted(wanted - given), sorted(given - wanted)
        raise TrainError(f"init_adapter {adapter}: does not fit this model's LoRA ({len(missing)} tensors missing, "
                         f"e.g. {missing[:1]}; {len(extra)} unknown, e.g. {extra[:1]}); train with the same base, "
                         "targets and r")
    set_peft_model_state_dict(model, state)


# ---------------------------------------------------------------------------------------------------
# Loss

def _chunk_ce(h, y, weight, softcap: float):
    import torch
    import torch.nn.functional as F

    logits = (h @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, reduction="sum")


def make_loss_module(model, chunk: int):
    """Wrap a causal LM so forward(ids, labels, mask) -> (summed loss, counted tokens).

    Only positions whose next token is a response token go through the output head, in chunks whose
    logits are recomputed in backward instead of kept: with a 262k vocabulary the full logits tensor
    is most of the step's time and memory. It is an nn.Module so DDP/FSDP see one forward per step.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    class _ResponseLoss(torch.nn.Module):
        def __init__(self, model, chunk):
            super().__init__()
            self.model = model
            self.chunk = chunk

        def forward(self, ids, labels, mask):
            lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            if not self.chunk:
                out = self.model(input_ids=ids, attention_mask=mask)
                logits = out.logits[:, :-1].float()
                y = labels[:, 1:]
                n = (y != D.IGNORE).sum()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                         ignore_index=D.IGNORE, reduction="sum")
                return loss, n
            backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            y = labels[:, 1:]
            sel = y != D.IGNORE
            h = hidden[:, :-1][sel]
            y = y[sel]
            weight = lm.get_output_embeddings().weight
            softcap = float(getattr(lm.config, "final_logit_softcapping", None) or 0.0)
            total = hidden.new_zeros((), dtype=torch.float32)
            for i in range(0, h.shape[0], self.chunk):
                part = (h[i:i + self.chunk], y[i:i + self.chunk], weight, softcap)
                if torch.is_grad_enabled():
                    total = total + checkpoint(_chunk_ce, *part, use_reentrant=False)
                else:
                    total = total + _chunk_ce(*part)
            return total, torch.tensor(h.shape[0], device=hidden.device)

    return _ResponseLoss(model, chunk)


# ---------------------------------------------------------------------------------------------------
# The loop

def lr_at(step: int, lr: float, warmup_steps: int, total: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to a tenth of `lr` at step `total`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate(loss_module, items: list[D.Encoded], batch_size: int, pad_id: int, device) -> float:
    """Token-weighted mean loss over items (no gradients)."""
    import torch

    loss_module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, mask in D.batches(items, batch_size, pad_id, seed=0, shuffle=False):
            s, n = loss_module(ids.to(device), labels.to(device), mask.to(device))
            total += float(s)
            count += int(n)
    loss_module.train()
    return total / max(1, count)


def plot_losses(history: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _Progress:
    """tqdm bar on a terminal, plain lines in a log file."""

    def __init__(self, total: int, initial: int):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, total: int, info: dict) -> None:
        text = " ".join(f"{k}={v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"step {step}/{total} {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_lora(cfg: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter; the best adapter (by eval loss) is saved to cfg.output/adapter."""
    import torch
    from accelerate import Accelerator

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = torch.cuda.is_available()
    accel = Accelerator(mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no",
                        cpu=not cuda, gradient_accumulation_steps=cfg.grad_accum)
    deepspeed = accel.state.deepspeed_plugin
    device = accel.device
    torch.manual_seed(cfg.seed)
    # bad data or an impossible setup fails before anything is written
    if cfg.qlora and not cuda:
        raise TrainError("qlora = true needs a CUDA GPU (bitsandbytes 4-bit); set qlora = false to train LoRA here")
    train_ex, eval_ex = D.load_mix(cfg.data, cfg.eval_fraction, cfg.seed, cfg.mix_total or None)
    model, tok, model_dir = load_base(cfg.base, cfg.qlora, str(device))
    template = D.resolve_template(tok, cfg.template, model.config.model_type)
    train_items = D.encode_all(train_ex, tok, template, cfg.max_seq_len)
    eval_items = D.encode_all(eval_ex, tok, template, cfg.max_seq_len)
    if not train_items:
        raise TrainError(f"{cfg.data[0].path}: no training example has a response token within max_seq_len="
                         f"{cfg.max_seq_len}; raise max_seq_len or shorten the prompts")
    per_pass = math.ceil(len(train_items) / (cfg.batch_size * cfg.grad_accum))
    total_steps = max(1, math.ceil(cfg.epochs * per_pass)) if cfg.epochs > 0 else cfg.max_steps

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.gradient_checkpointing and not cfg.qlora:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    hooks = hooks or TrainHooks()
    if hooks.adapt:
        model = hooks.adapt(model, cfg)
    elif cfg.lora_r:
        model = add_lora(model, cfg)
        if cfg.init_adapter:
            start_from(model, Path(cfg.init_adapter), cfg.lora_r)
    loss_module = make_loss_module(model, cfg.ce_chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda)
    if deepspeed is not None:
        # no dataloader goes through prepare(), so DeepSpeed cannot infer the micro-batch ("auto")
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    loss_module, opt = accel.prepare(loss_module, opt)

    ckpt = out / "checkpoint"
    adapter_dir = out / ("adapter" if cfg.lora_r else "model")  # lora_r = 0: full training (scratch)
    state = {"step": 0, "best": None, "bad_evals": 0, "history": [], "tokens": 0, "seconds": 0.0}
    if cfg.resume and (ckpt / "state.json").exists():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = json.loads((ckpt / "state.json").read_text())
        if deepspeed is not None:
            accel.load_state(str(ckpt / "accelerate"))
        else:
            if cfg.lora_r:
                set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors"))
            else:
                model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        if accel.is_main_process:
            print(f"resuming from {ckpt} at step {state['step']}", file=sys.stderr)
    if state["step"] >= total_steps:
        raise TrainError(f"{ckpt}: already trained {state['step']} of {total_steps} steps; "
                         "raise max_steps or delete the checkpoint to start over")

    # each process (DDP rank) draws its own batches; a resumed run does not replay the first ones
    stream = D.batches(train_items, cfg.batch_size, tok.pad_token_id,
                       cfg.seed + state["step"] + 100_003 * accel.process_index)
    n_tok = sum(len(i.ids) for i in train_items)
    n_resp = sum(sum(1 for lab in i.labels if lab != D.IGNORE) for i in train_items)
    accel.print(f"data: {len(train_items)} train / {len(eval_items)} eval examples, {n_tok} tokens "
                f"({n_resp} response); {total_steps} steps of {cfg.batch_size}x{cfg.grad_accum}; device {device}")
    progress = _Progress(total_steps, state["step"]) if accel.is_main_process else None
    loss_module.train()
    stopped_early = False
    last_loss = float("nan")
    t_start = time.perf_counter() - state["seconds"]

    def save_model(dest: Path):
        """The adapter (or whole model) in HF form; every rank calls it (ZeRO-3 gathers collectively)."""
        if deepspeed is not None and deepspeed.zero_stage == 3:
            full = accel.get_state_dict(loss_module)  # the loss module holds the model as `.model`
            if accel.is_main_process:
                full = {k.removeprefix("model."): v for k, v in full.items()}
                accel.unwrap_model(model).save_pretrained(dest, state_dict=full)
        elif accel.is_main_process:
            accel.unwrap_model(model).save_pretrained(dest)

    def save_checkpoint():
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if deepspeed is not None:
            accel.save_state(str(ckpt / "accelerate"))
            if accel.is_main_process:
                (ckpt / "state.json").write_text(json.dumps(state))
            return
        if not accel.is_main_process:
            return
        ckpt.mkdir(parents=True, exist_ok=True)
        # each file is written aside and renamed, state.json last: a run stopped (SIGTERM from the WebUI's
        # Stop, Ctrl-C) while saving keeps a checkpoint it can resume from
        if cfg.lora_r:
            sd = get_peft_model_state_dict(accel.unwrap_model(model))
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, ckpt / "adapter.safetensors.tmp")
            os.replace(ckpt / "adapter.safetensors.tmp", ckpt / "adapter.safetensors")
        else:
            torch.save(accel.unwrap_model(model).state_dict(), ckpt / "model.pt.tmp")
            os.replace(ckpt / "model.pt.tmp", ckpt / "model.pt")
        torch.save(opt.state_dict(), ckpt / "optimizer.pt.tmp")
        os.replace(ckpt / "optimizer.pt.tmp", ckpt / "optimizer.pt")
        (ckpt / "state.json.tmp").write_text(json.dumps(state))
        os.replace(ckpt / "state.json.tmp", ckpt / "state.json")

    while state["step"] < total_steps:
        t0 = time.perf_counter()
        if hooks.before_step:
            hooks.before_step(accel.unwrap_model(model), state["step"])
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], cfg.lr, cfg.warmup_steps, total_steps)
        step_loss, step_tokens, step_count = 0.0, 0, 0
        for _ in range(cfg.grad_accum):
            ids, labels, mask = (t.to(device) for t in next(stream))
            # accumulate() skips the gradient all-reduce (DDP) and the optimizer step (DeepSpeed) on all
            # but the last micro-batch; backward() divides the loss by grad_accum
            with accel.accumulate(loss_module), accel.autocast():
                s, n = loss_module(ids, labels, mask)
                loss = s / n.clamp(min=1)
                if hooks.extra_loss:
                    loss = loss + hooks.extra_loss()
                accel.backward(loss)
            step_loss += float(s.detach())
            step_count += int(n)
            step_tokens += int(mask.sum())
        accel.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        dt = time.perf_counter() - t0
        state["tokens"] += step_tokens
        state["seconds"] = time.perf_counter() - t_start
        last_loss = step_loss / max(1, step_count)
        record = {"step": state["step"], "loss": round(last_loss, 4), "tok_s": round(step_tokens / dt, 1),
                  "s_step": round(dt, 2)}
        step = state["step"]
        out_of_time = bool(cfg.time_limit) and state["seconds"] >= cfg.time_limit
        if eval_items and (step % cfg.eval_every == 0 or step == total_steps or out_of_time):
            ev = evaluate(loss_module, eval_items, cfg.batch_size, tok.pad_token_id, device)
            record["eval_loss"] = round(ev, 4)
            if state["best"] is None or ev < state["best"] - 1e-4:
                state["best"], state["bad_evals"] = ev, 0
                save_model(adapter_dir)
            else:
                state["bad_evals"] += 1
        state["history"].append(record)
        if progress:
            shown = {"loss": f"{last_loss:.3f}", "tok/s": f"{step_tokens / dt:.0f}"}
            if "eval_loss" in record:
                shown["eval"] = f"{record['eval_loss']:.3f}"
            progress.update(step, total_steps, shown)
        if cfg.patience and state["bad_evals"] >= cfg.patience:
            stopped_early = True
            if progress:
                progress.write(f"early stop at step {step}: eval loss has not improved for "
                               f"{cfg.patience} evaluations (best {state['best']:.4f})")
            break
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint()
        if out_of_time:
            if progress:
                progress.write(f"time limit {cfg.time_limit:.0f}s reached at step {step}")
            break
    if progress:
        progress.close()
    save_checkpoint()
    if not eval_items:  # nothing to choose the best by: keep the last
        save_model(adapter_dir)
    if accel.is_main_process:
        tok.chat_template = template  # merge + convert carry it into the GGUF's tokenizer.chat_template
        tok.save_pretrained(adapter_dir)
        meta = {"base": cfg.base, "model_dir": str(model_dir), "template": cfg.template,
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "data"},
                "data": [str(s.path) + (f"#{s.name}" if s.name else "") for s in cfg.data]}
        (out / "train.json").write_text(json.dumps({**meta, "history": state["history"]}, indent=1))
        plot_losses(state["history"], out / "loss.png", title=f"LoRA r={cfg.lora_r} on {Path(cfg.base).name}")
    seconds = state["seconds"]
    return TrainResult(out, adapter_dir, state["step"], state["best"], last_loss,
                       state["tokens"] / max(seconds, 1e-9), seconds, stopped_early, state["history"], total_steps)


# ---------------------------------------------------------------------------------------------------
# Evaluation helpers (perplexity of base vs adapter)

def load_with_adapter(adapter_dir: Path, base: str | None = None):
    """(peft model, tokenizer, template) of a trained adapter directory."""
    from peft import PeftModel

    meta_path = Path(adapter_dir).parent / "train.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model, tok, _ = load_base(base or meta.get("base") or "")
    model = PeftModel.from_pretrained(model, adapter_dir)
    template = D.resolve_template(tok, meta.get("template", "auto"), model.config.model_type)
    return model, tok, template


def perplexity(model, tok, template: str, examples: list[D.Example], max_len: int = 512,
               batch_size: int = 4, chunk: int = 256) -> float:
    """exp(mean loss) over the response tokens of `examples` (all tokens for text examples)."""
    items = D.encode_all(examples, tok, template, max_len)
    if not items:
        raise TrainError("no held-out example has a response token; give longer held-out texts")
    module = make_loss_module(model, chunk)
    device = next(model.parameters()).device
    return math.exp(evaluate(module, items, batch_size, tok.pad_token_id, device))
