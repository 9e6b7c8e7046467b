"""A Raspberry Pi Zero 2W simulated here: the whole demo set (router, five experts, knowledge packs) answering
inside a 512 MB memory cgroup on one core, with the pi-zero-2w profile; prints one JSON document.

Every question goes through `?` (the Ensemble: route, knowledge pairs, expert), one per domain, then each expert
is asked directly. Reported: peak memory of the cgroup (the kernel's high-water mark, page cache of the model
file included: the caches are dropped first), the process's peak RSS, how often it hit the limit, decode
tokens/s, whether anything was refused or killed. Needs root and cgroup v1 or v2 (as on this
build box); elsewhere it says why and exits 2.

    sudo .venv/bin/python bench/pizero.py [--memory 512M] [--cpus 0] [--tokens 48]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "hublab-pizero"
QUESTIONS = ["What is a decorator in Python?", "What does the borrow checker do?", "How do I free disk space?",
             "What is a learning rate?", "Why is the sky blue?"]

CHILD = r"""
import json, sys, time
from hublab.runtime.serve.device import Device
from hublab.runtime.engine.runtime import Runtime
rt = Runtime(models_dir={models!r}, profile="pi-zero-2w", keep_alive=-1)
dev = Device(rt)
out = {{"threads": rt.threads, "answers": []}}
for q in {questions!r}:
    t0 = time.perf_counter()
    r = dev.ask(q, max_tokens={tokens})
    stats = [a["stats"] for a in r["answers"] if a.get("stats")]
    out["answers"].append({{"q": q, "via": r["selected"], "seconds": round(time.perf_counter() - t0, 2),
                           "tok_s": [s["tokens_per_s"] for s in stats], "text": r["answer"][:100]}})
for e in sorted(rt.experts):
    g = dev.context.generate(e, "What is it for?", max_tokens={tokens})
    out["answers"].append({{"q": "What is it for?", "via": [e], "seconds": g.seconds, "tok_s": [g.tokens_per_s],
                           "text": g.text[:100]}})
out["loaded"] = rt.loaded()
print(json.dumps(out))
"""


class Cgroup:
    """A memory + cpuset cgroup (v1 hierarchy or v2 unified); `enter` is called in the child before exec."""

    def __init__(self, memory: int, cpus: str):
        v1 = Path("/sys/fs/cgroup/memory")
        self.v2 = not v1.is_dir()
        if self.v2:
            self.dirs = [Path("/sys/fs/cgroup") / NAME]
        else:
            self.dirs = [v1 / NAME, Path("/sys/fs/cgroup/cpuset") / NAME]
        try:
            self._make(memory, cpus)
        except OSError:
            self.remove()
            raise

    def _make(self, memory: int, cpus: str) -> None:
        for d in self.dirs:
            d.mkdir(exist_ok=True)
        if self.v2:
            (self.dirs[0] / "memory.max").write_text(str(memory))
            (self.dirs[0] / "memory.swap.max").write_text("0")
            (self.dirs[0] / "cpuset.cpus").write_text(cpus)
        else:
            (self.dirs[0] / "memory.limit_in_bytes").write_text(str(memory))
            (self.dirs[0] / "memory.max_usage_in_bytes").write_text("0")
            (self.dirs[0] / "memory.failcnt").write_text("0")
            (self.dirs[1] / "cpuset.cpus").write_text(cpus)
            (self.dirs[1] / "cpuset.mems").write_text("0")

    def enter(self) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.dirs[0] / name).read_text())

    def hits(self) -> int:
        if self.v2:
            events = dict(line.split() for line in (self.dirs[0] / "memory.events").read_text().splitlines())
            return int(events.get("max", 0))
        return int((self.dirs[0] / "memory.failcnt").read_text())

    def remove(self) -> None:
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="512M", help="memory limit of the cgroup (default 512M, a Pi Zero 2W)")
    ap.add_argument("--cpus", default="0", help="CPUs the cgroup may use (default 0: one core)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per answer (default 48)")
    args = ap.parse_args()
    from hublab.runtime.config import parse_size

    try:
        limit = parse_size(args.memory)
    except ValueError as exc:
        print(f"pizero: --memory: {exc}", file=sys.stderr)
        return 2
    try:
        group = Cgroup(limit, args.cpus)
    except OSError as exc:
        print(f"pizero: cannot make a cgroup ({exc}); run as root on a Linux with cgroups", file=sys.stderr)
        return 2
    code = CHILD.format(models=str(ROOT / "models"), questions=QUESTIONS, tokens=args.tokens)
    # the model file's pages count against the cgroup only if its process reads them in: start from a cold cache
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        cold = True
    except OSError:
        cold = False  # then the peak may miss the model file's pages
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=group.enter,
                              env={**os.environ, "HUBLAB_HOME": str(Path("/tmp") / NAME)})
        report = {"memory_limit_mb": limit >> 20, "cpus": args.cpus, "exit": proc.returncode,
                  "peak_mb": round(group.peak() / 2**20, 1), "limit_hits": group.hits(),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
                  "cold_page_cache": cold}
    finally:
        group.remove()
    if proc.returncode == 0:
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        rates = [r for a in child["answers"] for r in a["tok_s"] if r]
        report.update(threads=child["threads"], loaded=child["loaded"], answers=child["answers"],
                      median_tok_s=sorted(rates)[len(rates) // 2] if rates else 0.0)
    else:
        report["error"] = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
    print(json.dumps(report, indent=2))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
