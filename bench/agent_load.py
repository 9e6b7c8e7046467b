"""Load test of the device agent: N concurrent clients on loopback, bounded in requests and in time.

Starts `hublab serve` on a free loopback port (or uses --url), lets --clients threads send chat
completions until --requests have been sent or --seconds have passed, and prints one JSON document:
how many were served (200), refused with 503 (queue full), or failed otherwise, latencies, tokens, and
the agent's resident memory before the load, after the first answer, and at the end.

    .venv/bin/python bench/agent_load.py --clients 16 --requests 64 --seconds 120 --model general
    .venv/bin/python bench/agent_load.py --config /tmp/tiny/system.toml --model alpha --queue-size 2
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

import httpx
import psutil

HUBLAB = str(Path(sys.executable).parent / "hublab")


def start_agent(config: str | None, queue_size: int | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    if config:
        env["HUBLAB_CONFIG"] = config
    cmd = [HUBLAB, "serve", "--host", "127.0.0.1", "--port", "0", "--quiet"]
    if queue_size:
        cmd += ["--queue-size", str(queue_size)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = proc.stdout.readline()
    if not banner.startswith("hublab agent"):
        proc.kill()
        raise SystemExit(f"agent did not start: {banner}{proc.stderr.read()}")
    return proc, banner.split(" on ", 1)[1].split(" ", 1)[0]


def rss(pid: int | None) -> int | None:
    return psutil.Process(pid).memory_info().rss if pid else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="system.toml for the agent (default: $HUBLAB_CONFIG or the user's)")
    p.add_argument("--url", help="use a running agent instead of starting one (RSS is then not measured)")
    p.add_argument("--token", default=os.environ.get("HUBLAB_TOKEN", ""), help="bearer token for --url")
    p.add_argument("--model", default="moe", help="expert name or moe (default moe)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=32, help="most requests in all (default 32)")
    p.add_argument("--seconds", type=float, default=120.0, help="stop sending after this long (default 120)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    p.add_argument("--queue-size", type=int, help="the agent's queue size (default: its [agent] queue_size)")
    p.add_argument("--stream", action="store_true", help="ask for SSE streaming answers")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.seconds <= 0:
        p.error("--clients, --requests and --seconds must be positive")

    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start_agent(args.config, args.queue_size)
    pid = proc.pid if proc else None
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        rss_start = rss(pid)
        lock = threading.Lock()
        counts = {"served": 0, "rejected_503": 0, "errors": 0}
        latencies: list[float] = []
        tokens = [0]
        errors: list[str] = []
        issued = [0]
        first_done = threading.Event()
        rss_first: list[int | None] = [None]
        deadline = time.monotonic() + args.seconds

        def take() -> bool:
            with lock:
                if issued[0] >= args.requests or time.monotonic() >= deadline:
                    return False
                issued[0] += 1
                return True

        def client(i: int) -> None:
            with httpx.Client(base_url=url, headers=headers) as http:
                while take():
                    body = {"model": args.model, "max_tokens": args.max_tokens, "stream": args.stream,
                            "stream_options": {"include_usage": True} if args.stream else None,
                            "messages": [{"role": "user", "content": f"Question {i}: how do I read a file in python?"}]}
                    t0 = time.perf_counter()
                    try:
                        timeout = max(1.0, deadline - time.monotonic() + 60)
                        if args.stream:
                            with http.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as r:
                                status, used = r.status_code, 0
                                for line in r.iter_lines():  # the last chunk before [DONE] carries the usage
                                    if line.startswith("data: {") and '"usage"' in line:
                                        used = json.loads(line[6:])["usage"]["completion_tokens"]
                        else:
                            r = http.post("/v1/chat/completions", json=body, timeout=timeout)
                            status = r.status_code
                            used = r.json()["usage"]["completion_tokens"] if status == 200 else 0
                    except (httpx.HTTPError, ValueError, KeyError) as exc:
                        status, used = None, 0
                        with lock:
                            errors.append(f"{exc.__class__.__name__}: {exc}"[:200])
                    elapsed = time.perf_counter() - t0
                    with lock:
                        if status == 200:
                            counts["served"] += 1
                            latencies.append(elapsed)
                            tokens[0] += used
                            if not first_done.is_set():
                                first_done.set()
                                rss_first[0] = rss(pid)
                        elif status == 503:
                            counts["rejected_503"] += 1
                        else:
                            counts["errors"] += 1
                            if status is not None:
                                errors.append(f"HTTP {status}")
                    if status == 503:
                        time.sleep(0.05)  # a polite client backs off a little before trying again

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        metrics = httpx.get(url + "/metrics", headers=headers).text
        rss_end = rss(pid)
        lat = sorted(latencies)
        doc = {
            "url": url, "model": args.model, "clients": args.clients, "requests_sent": issued[0],
            "request_limit": args.requests, "seconds_limit": args.seconds, "max_tokens": args.max_tokens,
            "stream": args.stream, **counts, "wall_s": round(wall, 2),
            "latency_s": {"p50": round(statistics.median(lat), 3) if lat else None,
                          "p95": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
                          "max": round(lat[-1], 3) if lat else None},
            "completion_tokens": tokens[0], "tokens_per_s": round(tokens[0] / wall, 2) if wall else 0.0,
            "rss_before": rss_start, "rss_after_first_answer": rss_first[0], "rss_after": rss_end,
            "rss_growth_after_first_answer": (rss_end - rss_first[0]) if rss_end and rss_first[0] else None,
            "agent_rejected_total": _metric(metrics, "hublab_rejected_total"),
            "agent_cancelled_total": _metric(metrics, "hublab_cancelled_total"),
            "error_samples": errors[:5],
        }
        print(json.dumps(doc, indent=2))
        return 0 if counts["errors"] == 0 else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


if __name__ == "__main__":
    sys.exit(main())
