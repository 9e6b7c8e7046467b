"""Multi-token heads: tokens per backbone forward and answer accuracy, heads vs the backbone's greedy decoding.

A tiny Llama backbone is trained from scratch on a synthetic QA task (repeat a list of words, count
from a number), then frozen; `hublab train heads` trains router and heads on another sample of the
same task and evaluates on its held-out split. Greedy decoding, heads and verified heads all run on
the same backbone and the same held-out questions in this one run. Prints one JSON object whose
`ratio` holds the heads' (and verified decoding's) tokens per forward over greedy's, and their accuracy
minus greedy's (a difference: greedy's accuracy can be 0).

    .venv/bin/python bench/heads.py                       # about 4 CPU minutes
    .venv/bin/python bench/heads.py --ppo-steps 30 --heads 4 --k-max 4 --out /tmp/heads-bench

Runs here (1 thread, defaults, 20 held-out questions): greedy accuracy 0.65 at 1.00 tokens per forward;
heads after stage 2 0.45 at 1.52, after --ppo-steps 30 0.50 at 1.37; verified heads 0.65 at 1.25 (the
greedy text at 20 % fewer forwards).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("apple river stone cloud green house music paper light table water smile bread chair night ocean "
         "garden window silver forest").split()


def qa(n: int, seed: int) -> list[dict]:
    """Half word-repetition, half counting questions; the answers are short and fully determined."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            words = " ".join(rng.sample(WORDS, rng.randint(3, 6)))
            rows.append({"question": f"Repeat the words: {words}", "response": words})
        else:
            a, k = rng.randint(0, 90), rng.randint(3, 6)
            rows.append({"question": f"Count from {a} to {a + k - 1}",
                         "response": " ".join(str(a + j) for j in range(k))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="work directory (default: a temporary one); a backbone there is reused")
    p.add_argument("--backbone-steps", type=int, default=4000)
    p.add_argument("--pretrain", type=int, default=6000, help="QA pairs the backbone learns the task from")
    p.add_argument("--examples", type=int, default=200, help="QA pairs for the heads (10%% held out)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k-max", type=int, default=4)
    p.add_argument("--stage1-epochs", type=int, default=40)
    p.add_argument("--stage2-epochs", type=int, default=20)
    p.add_argument("--ppo-steps", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from hublab.trainer import heads
    from hublab.trainer.train import scratch

    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="hublab-heads-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backbone = root / "backbone"
    if not (backbone / "model" / "config.json").exists():
        pre = write_jsonl(root / "pretrain.jsonl", qa(args.pretrain, seed=1))
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
            scratch("tiny", [pre], backbone, vocab_size=500, max_steps=args.backbone_steps, batch_size=16,
                    max_seq_len=128, lr=3e-3, threads=args.threads, patience=0, eval_every=250)
    data = write_jsonl(root / "qa.jsonl", qa(args.examples, seed=0))
    run = root / f"heads-h{args.heads}-k{args.k_max}-ppo{args.ppo_steps}"
    report = heads.train_heads(str(backbone / "model"), data, run, heads=args.heads, k_max=args.k_max,
                               stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs,
                               ppo_steps=args.ppo_steps, batch=16, lr=3e-3, router_hidden=128, max_seq_len=128,
                               max_tokens=24, threads=args.threads, resume=False)
    ev = report.get("eval")
    if not ev:
        print("bench/heads.py: no held-out examples; raise --examples", file=sys.stderr)
        return 1
    greedy = ev["greedy"]
    ratio = {}
    for name in ("heads", "verified"):
        per_forward = ev[name]["tokens_per_forward"] / greedy["tokens_per_forward"]
        ratio[f"{name}_tokens_per_forward_vs_greedy"] = round(per_forward, 3)
        ratio[f"{name}_accuracy_minus_greedy"] = round(ev[name]["accuracy"] - greedy["accuracy"], 3)
    print(json.dumps({"device": "cpu", "threads": args.threads, "heads": args.heads, "k_max": args.k_max,
                      "stage1_epochs": args.stage1_epochs, "stage2_epochs": args.stage2_epochs,
                      "ppo_steps": args.ppo_steps, "held_out": ev["examples"],
                      "greedy": greedy, "heads_decoding": ev["heads"], "verified": ev["verified"], "ratio": ratio,
                      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
