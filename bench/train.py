"""Training throughput and peak memory: hublab's LoRA loop vs plain HF Trainer + PEFT.

Same model, same LoRA (r=8 on all seven projections), same examples, batch size, sequence cap and
device. Each side runs in its own process so peak memory is its own (CPU: peak RSS; CUDA: peak
allocated). Prints one JSON object with both sides and the ratios (ours / HF).

    .venv/bin/python bench/train.py                       # gemma-3-270m, CPU or the GPU if present
    .venv/bin/python bench/train.py --model DIR --steps 20 --batch 16 --seq 512
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_data(path: Path, n: int) -> Path:
    """Q/A records of mixed length (prompts ~40-60%, answers the rest), deterministic."""
    import random

    rng = random.Random(0)
    words = ("the model reads a question and writes an answer about python rust linux memory adapters "
             "quantization boards routers experts tokens layers attention training data").split()
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
        rows.append(json.dumps({"question": f"{i}: {q}?", "response": a}))
    path.write_text("\n".join(rows) + "\n")
    return path


def peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(args) -> dict:
    from hublab.trainer.data import DataSpec
    from hublab.trainer.lora import TrainConfig, train_lora

    cfg = TrainConfig(base=args.model, output=Path(args.work) / "ours", data=[DataSpec(Path(args.data))],
                      max_seq_len=args.seq, batch_size=args.batch, max_steps=args.steps + args.warmup,
                      eval_fraction=0.0, save_every=0, resume=False, lr=1e-4, warmup_steps=1,
                      lora_r=8, lora_alpha=16, threads=args.threads)
    result = train_lora(cfg)
    timed = result.history[args.warmup:]
    secs = sum(h["s_step"] for h in timed)
    tokens = sum(h["tok_s"] * h["s_step"] for h in timed)
    return {"tokens_per_s": tokens / secs, "s_per_step": secs / len(timed), "peak_bytes": peak_memory()}


def run_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hublab.trainer import data as D
    from hublab.trainer.lora import load_base

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, _ = load_base(args.model)
    template = D.resolve_template(tok, "auto", model.config.model_type)
    items = D.encode_all(D.load_examples(D.DataSpec(Path(args.data))), tok, template, args.seq)
    rows = [{"input_ids": i.ids, "labels": i.labels} for i in items]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    counted = []
    base_collate = collate

    def counting_collate(batch):
        out = base_collate(batch)
        counted.append(int(out["attention_mask"].sum()))
        return out

    cuda = torch.cuda.is_available()
    targs = TrainingArguments(output_dir=str(Path(args.work) / "hf"), per_device_train_batch_size=args.batch,
                              max_steps=args.steps + args.warmup, learning_rate=1e-4, logging_steps=1000,
                              save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda,
                              dataloader_num_workers=0, remove_unused_columns=False, warmup_steps=1)
    Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting_collate,
            callbacks=[Clock()]).train()
    # the dataloader may prefetch one batch ahead: pair each timed step with the batch it consumed
    timed = list(zip(times, counted))[args.warmup:]
    secs = sum(t for t, _ in timed)
    return {"tokens_per_s": sum(n for _, n in timed) / secs, "s_per_step": secs / len(timed),
            "peak_bytes": peak_memory()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--variant", choices=["ours", "hf"])
    p.add_argument("--data")
    p.add_argument("--work")
    args = p.parse_args()
    if args.variant:
        print(json.dumps((run_ours if args.variant == "ours" else run_hf)(args)))
        return 0
    with tempfile.TemporaryDirectory() as work:
        data = make_data(Path(work) / "data.jsonl", args.examples)
        results = {}
        for variant in ("hf", "ours"):
            cmd = [sys.executable, __file__, "--variant", variant, "--data", str(data), "--work", work,
                   "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    ours, hf = results["ours"], results["hf"]
    print(json.dumps({
        "device": device, "model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "ours": ours, "hf_trainer_peft": hf,
        "tokens_per_s_ratio": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
        "peak_memory_ratio": round(ours["peak_bytes"] / hf["peak_bytes"], 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
