"""A remote hublab expert through a front board vs asked of its own board, and what remote experts cost the front;
prints one JSON document with the ratios, measured in one run on loopback.

(a) time: a peer `hublab serve` over the embedded demo set (gemma-3-270m + five adapters) and a front `hublab serve`
    whose system.toml names it as a [[peer]]. The same question is asked, streamed (OpenAI API, greedy), of the peer
    as `python` and of the front as `python@den`, interleaved. Reported: the median of each pair's ratio of
    whole-answer seconds and of each pair's first-chunk difference (a shared machine's load moves both of a pair
    alike), the medians themselves, and the front's own CPU seconds per relayed answer; goals: front/peer time
    <= 1.10x, first chunk <= +50 ms.
(b) memory: the front's RSS (its own process, psutil) after it has routed a question, with no peers (the embedded
    demo set alone), and with the peer's five experts on it after routing and one streamed answer from each of them:
    on its first start (the remote experts' examples embedded then) and on the next (read from the embedding cache,
    as a board runs from then on); goal: <= +15 MB.

Usage: .venv/bin/python bench/remote.py [--tokens 64] [--rounds 5]
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

HUBLAB = str(Path(sys.executable).parent / "hublab")
QUESTION = "How do I create a virtual environment and install packages with pip?"
EXPERTS = ["ai", "general", "python", "rust", "system"]


def serve(config: Path, home: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HUBLAB_CONFIG": str(config), "HUBLAB_HOME": str(home)}
    env.pop("HUBLAB_TOKEN", None)
    p = subprocess.Popen([HUBLAB, "serve", "--port", "0", "--quiet"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    banner = p.stdout.readline()
    if " on " not in banner:
        p.kill()
        raise SystemExit(f"hublab serve did not start: {banner!r}")
    return p, banner.split(" on ", 1)[1].split(" ", 1)[0]


def ask(url: str, model: str, tokens: int) -> tuple[float, float, str]:
    """(seconds to the whole answer, seconds to its first content chunk, its text), streamed."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first, text = None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            doc = json.loads(line[6:])
            if "error" in doc:
                raise SystemExit(f"{model} at {url}: {doc['error']}")
            if doc.get("choices") and doc["choices"][0]["delta"].get("content"):
                first = first if first is not None else time.perf_counter() - t0
                text.append(doc["choices"][0]["delta"]["content"])
    return time.perf_counter() - t0, first if first is not None else float("inf"), "".join(text)


def rss(p: subprocess.Popen) -> int:
    import psutil

    return psutil.Process(p.pid).memory_info().rss


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hublab-bench-remote-"))
    (root / "peer.toml").write_text('[runtime]\nprofile = "host"\nthreads = 1\n')
    peer, peer_url = serve(root / "peer.toml", root / "peer-home")
    procs = [peer]
    try:
        (root / "none.toml").write_text('[runtime]\nprofile = "host"\nthreads = 1\n')
        (root / "five.toml").write_text('[runtime]\nprofile = "host"\nthreads = 1\n\n[[peer]]\nname = "den"\n'
                                        f'url = "{peer_url}"\n')
        # (b) the front's memory, with none and with five remote experts
        alone, alone_url = serve(root / "none.toml", root / "front-home")
        procs.append(alone)
        httpx.post(alone_url + "/hublab/route", json={"query": QUESTION}, timeout=120).raise_for_status()
        rss_none = rss(alone)
        alone.terminate()
        alone.wait()
        rss_five = []
        for start in ("first", "next"):
            front, front_url = serve(root / "five.toml", root / "front-home")
            procs.append(front)
            listed = [m["id"] for m in httpx.get(front_url + "/v1/models", timeout=60).json()["data"]]
            remote = [f"{e}@den" for e in EXPERTS if f"{e}@den" in listed]
            if len(remote) != 5:
                raise SystemExit(f"the front lists {remote} of the peer's five experts")
            httpx.post(front_url + "/hublab/route", json={"query": QUESTION}, timeout=120).raise_for_status()
            for name in remote:
                ask(front_url, name, 8)
            rss_five.append(rss(front))
            if start == "first":
                front.terminate()
                front.wait()

        # (a) one remote expert through the front vs its own board, interleaved after a warm-up of each
        ask(peer_url, "python", args.tokens)
        ask(front_url, "python@den", args.tokens)
        import psutil

        direct, through, same, cpu = [], [], True, []
        me = psutil.Process(front.pid)
        load = os.getloadavg()[0]
        for i in range(args.rounds):  # which goes first alternates, so neither always follows the other
            order = [("peer", peer_url, "python"), ("front", front_url, "python@den")][::1 if i % 2 == 0 else -1]
            got = {}
            for kind, url, model in order:
                c0 = sum(me.cpu_times()[:2])
                got[kind] = ask(url, model, args.tokens)
                if kind == "front":
                    cpu.append(sum(me.cpu_times()[:2]) - c0)
            direct.append(got["peer"])
            through.append(got["front"])
            same = same and got["peer"][2] == got["front"][2]
        ratio = statistics.median(f[0] / d[0] for d, f in zip(direct, through))
        extra_ms = statistics.median((f[1] - d[1]) * 1000 for d, f in zip(direct, through))
        extra = [(r - rss_none) / 2**20 for r in rss_five]
        report = {
            "bench": "remote", "host_cpus": os.cpu_count(), "load_average": [round(load, 2),
                                                                              round(os.getloadavg()[0], 2)],
            "tokens": args.tokens, "rounds": args.rounds, "question": QUESTION,
            "time": {"peer_direct_median_s": round(statistics.median(x[0] for x in direct), 4),
                     "through_front_median_s": round(statistics.median(x[0] for x in through), 4),
                     "ratio_median_of_pairs": round(ratio, 4), "goal": "<= 1.10", "ok": ratio <= 1.10,
                     "front_cpu_s_per_answer": round(statistics.median(cpu), 4)},
            "first_token": {"peer_direct_median_s": round(statistics.median(x[1] for x in direct), 4),
                            "through_front_median_s": round(statistics.median(x[1] for x in through), 4),
                            "extra_ms_median_of_pairs": round(extra_ms, 1), "goal": "<= +50 ms", "ok": extra_ms <= 50},
            "same_text": same,
            "front_rss": {"no_peers_mb": round(rss_none / 2**20, 1),
                          "five_remote_first_start_mb": round(rss_five[0] / 2**20, 1),
                          "five_remote_next_start_mb": round(rss_five[1] / 2**20, 1),
                          "extra_first_start_mb": round(extra[0], 1), "extra_next_start_mb": round(extra[1], 1),
                          "goal": "<= +15 MB", "ok_first_start": extra[0] <= 15, "ok_next_start": extra[1] <= 15,
                          "remote_experts": remote},
        }
        print(json.dumps(report, indent=2))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
