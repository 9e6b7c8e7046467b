"""`moe` streamed over HTTP against its expert alone, and a stopped multi-expert answer; prints one JSON document.

(a) first chunk: a real `hublab serve` on loopback over the embedded demo set; each question is asked with
    `stream: true` through the official `openai` client, as `moe` and as the expert the router picks for it
    (interleaved). Reported: seconds to the first content chunk and chunks per answer; goal: moe's first chunk
    <= 1.5x the expert's, and more than one chunk.
(b) stop: `?` with two experts and summarize, stopped (the shell's Ctrl-C sets the same event) at the first
    streamed word; seconds from the stop to the answer returning (goal <= 1 s) and whether the summariser started.

Usage: .venv/bin/python bench/moe_stream.py [--tokens 48] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTIONS = ["What is a decorator in Python?", "What does the borrow checker do?", "How do I free disk space?",
             "What is a learning rate?", "Why is the sky blue?"]
HUBLAB = str(Path(sys.executable).parent / "hublab")


def first_chunk(client, model: str, question: str, tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    first, chunks = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter() - t0
    return first if first is not None else float("inf"), chunks


def streaming(tokens: int, rounds: int) -> dict:
    import httpx
    from openai import OpenAI

    env = {**os.environ, "HUBLAB_HOME": os.environ.get("HUBLAB_HOME", "/tmp/hublab-bench-moe-stream")}
    p = subprocess.Popen([HUBLAB, "serve", "--port", "0", "--quiet"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        url = p.stdout.readline().split(" on ", 1)[1].split(" ", 1)[0]
        client = OpenAI(base_url=url + "/v1", api_key="none")
        rows = []
        for q in QUESTIONS:
            expert = httpx.post(url + "/hublab/route", json={"query": q}, timeout=60).json()["selected"][0]["name"]
            first_chunk(client, "moe", q, 4)  # loads the base and this expert's adapter
            first_chunk(client, expert, q, 4)
            moe, alone = [], []
            for _ in range(rounds):  # interleaved, so both see the same machine load
                moe.append(first_chunk(client, "moe", q, tokens))
                alone.append(first_chunk(client, expert, q, tokens))
            rows.append({"q": q, "expert": expert,
                         "first_chunk_s": {"moe": round(statistics.median(m[0] for m in moe), 3),
                                           "expert": round(statistics.median(a[0] for a in alone), 3)},
                         "chunks": {"moe": min(m[1] for m in moe), "expert": min(a[1] for a in alone)}})
    finally:
        p.terminate()
        p.wait(timeout=30)
    ratio = statistics.median(r["first_chunk_s"]["moe"] / r["first_chunk_s"]["expert"] for r in rows)
    return {"questions": rows, "first_chunk_ratio_median": round(ratio, 3), "goal": "<= 1.5, chunks > 1",
            "min_moe_chunks": min(r["chunks"]["moe"] for r in rows)}


def stop(tokens: int) -> dict:
    from hublab.runtime.serve.device import Device
    from hublab.runtime.engine.runtime import Runtime

    dev = Device(Runtime(keep_alive=-1))
    rows = []
    for q in QUESTIONS[:3]:
        cancel, started = threading.Event(), []
        stopped_at = []

        def on_event(kind: str, data: dict) -> None:
            if kind == "expert_start":
                started.append(data.get("role", "expert"))
            if kind == "expert_token" and not cancel.is_set():
                cancel.set()
                stopped_at.append(time.perf_counter())

        dev.ask(q, routing="topk:2", synthesis="summarize", max_tokens=tokens)  # warm: both experts loaded
        r = dev.ask(q, routing="all", synthesis="summarize", on_event=on_event, cancel=cancel, max_tokens=tokens)
        rows.append({"q": q, "return_after_stop_s": round(time.perf_counter() - stopped_at[0], 3),
                     "experts_started": started.count("expert"), "summariser_started": "aggregator" in started,
                     "finish_reason": r["finish_reason"]})
    dev.close()
    return {"questions": rows, "max_return_after_stop_s": max(r["return_after_stop_s"] for r in rows),
            "goal": "<= 1.0 s, no summariser"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps({"stream": streaming(args.tokens, args.rounds), "stop": stop(args.tokens)}, indent=1))


if __name__ == "__main__":
    main()
