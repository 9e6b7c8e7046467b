"""The weight-buffer decision from recorded /proc/cpuinfo samples of other hosts, and a real load on this one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hublab.runtime.errors import HublabError
from hublab.runtime.engine.hostcpu import (configure_llama, decide, extra_buffer_types, host_cpu, load_llama,
                                    parse_cpuinfo)

SAMPLES = Path(__file__).parent / "fixtures" / "cpuinfo"


def sample(name: str):
    return parse_cpuinfo((SAMPLES / name).read_text())


@pytest.mark.parametrize("name, arch, amx, flag", [
    ("x86_64-xeon-amx.txt", "x86_64", True, "avx512_vnni"),
    ("x86_64-epyc-avx512.txt", "x86_64", False, "avx512f"),
    ("aarch64-pi5-cortex-a76.txt", "aarch64", False, "asimddp"),
    ("aarch64-pi-zero-2w-cortex-a53.txt", "aarch64", False, "asimd"),
    ("armv7l-pi4-32bit.txt", "armv7l", False, "neon"),
])
def test_samples_parse(name, arch, amx, flag):
    cpu = sample(name)
    assert (cpu.arch, cpu.has_amx) == (arch, amx)
    assert flag in cpu.flags


def test_amx_host_keeps_weights_in_plain_buffers():
    cpu = sample("x86_64-xeon-amx.txt")
    for available in (None, ("AMX", "CPU_REPACK")):  # a build we cannot ask, and one that offers AMX
        d = decide(cpu, available)
        assert not d.extra and d.in_use() == ["CPU"]
        assert "#20824" in d.reason and "AMX" in d.reason
    # built without AMX (e.g. a wheel compiled on another machine): nothing to crash, repacking stays
    d = decide(cpu, ("CPU_REPACK",))
    assert d.extra and d.in_use() == ["CPU_REPACK", "CPU"]


@pytest.mark.parametrize("name, repack, words", [
    ("x86_64-epyc-avx512.txt", True, "CPU_REPACK"),
    ("aarch64-pi5-cortex-a76.txt", True, "with dotprod"),
    # no repacked Q4 kernels without dotprod: bench/repack.py --arm measured 0.96x under qemu as a Cortex-A53
    ("aarch64-pi-zero-2w-cortex-a53.txt", False, "without dotprod"),
    ("armv7l-pi4-32bit.txt", False, "without dotprod"),
])
def test_other_hosts(name, repack, words):
    d = decide(sample(name), ("CPU_REPACK",))
    assert d.extra is repack and words in d.reason


def test_override():
    amx = sample("x86_64-xeon-amx.txt")
    assert decide(amx, None, "on").extra
    assert not decide(sample("aarch64-pi5-cortex-a76.txt"), None, "off").extra
    assert not decide(amx, None, "auto").extra
    with pytest.raises(HublabError, match="HUBLAB_REPACK='sometimes' is not a setting; use on, off or auto"):
        decide(amx, None, "sometimes")


def test_this_host_follows_the_rule():
    """The library answers which extra buffer types it has, and the process-wide decision is the rule's."""
    available = extra_buffer_types()
    assert available is not None, "llama.cpp's CPU backend did not list its extra buffer types"
    d = configure_llama()
    assert d == decide(host_cpu(), available, os.environ.get("HUBLAB_REPACK"))
    import llama_cpp

    assert llama_cpp.llama_model_default_params().use_extra_bufts is d.extra
    if not host_cpu().has_amx:
        assert "AMX" not in available


def test_ai_info_says_which_buffers(tmp_path):
    env = {**os.environ, "HUBLAB_HOME": str(tmp_path), "TERM": "dumb"}
    p = subprocess.run([str(Path(sys.executable).parent / "hublab"), "shell", "--json", "-c", "ai info"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    weights = json.loads(p.stdout)["result"]["weights"]
    assert weights["buffer_types"][-1] == "CPU" and weights["reason"]
    human = subprocess.run([str(Path(sys.executable).parent / "hublab"), "shell", "-c", "ai info"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert "weights      " in human.stdout and weights["reason"] in human.stdout


SMOKE = """
import json, sys
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.engine.hostcpu import configure_llama
rt = Runtime(profile="host", threads=1, keep_alive=-1)
r = rt.generate("gemma3-270m", "The capital of France is", raw=True, max_tokens=12, temperature=0.0)
print(json.dumps({"text": r.text, "repack": configure_llama().extra}))
"""


def test_gemma_loads_and_decodes_in_a_fresh_process(gemma_gguf, tmp_path):
    """The way the runtime loads the base, in a child (a crash shows as a signal, not a lost test run); the
    plain-buffer load that AMX hosts get answers as the host's own choice does (the same first words: the two
    kernels round differently, so long greedy texts may part at a near-tie)."""
    runs = {}
    for mode in ("auto", "off"):
        env = {**os.environ, "HUBLAB_HOME": str(tmp_path / mode), "HUBLAB_REPACK": mode}
        p = subprocess.run([sys.executable, "-c", SMOKE], env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
        runs[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    assert runs["off"]["repack"] is False
    first = {mode: run["text"].split()[:3] for mode, run in runs.items()}
    assert len(first["auto"]) == 3 and first["auto"] == first["off"], runs


def test_load_llama_applies_to_trainer_loads(tiny_gguf):
    llm = load_llama(tiny_gguf, n_ctx=32, n_threads=1, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is configure_llama().extra
    finally:
        llm.close()


def test_profiles_without_dotprod_keep_one_copy_of_the_weights():
    """A Zero 2W, Pi 3 or Pi 4 has no repacked Q4 kernels in llama.cpp: a runtime on those profiles keeps the
    weights in the file's pages (what the board does) even on a host that could repack; Pi 5 and the host repack."""
    from hublab.runtime.engine.hostcpu import for_profile
    from hublab.runtime.engine.profiles import board_profiles

    host = decide(sample("x86_64-epyc-avx512.txt"), ("CPU_REPACK",))
    profiles = board_profiles()
    got = {name: for_profile(host, p.cpu, p.dotprod, name).extra for name, p in profiles.items()}
    assert not got["pi-zero-2w"] and not got["pi3b"] and not got["pi4-4gb"]
    assert got["pi5-8gb"]
    assert "no dotprod" in for_profile(host, "cortex-a53", False, "pi-zero-2w").reason
    assert for_profile(host, "cortex-a53", False, "pi-zero-2w", override="on").extra  # the user's word wins
    amx = decide(sample("x86_64-xeon-amx.txt"))
    assert not for_profile(amx, "cortex-a76", True, "pi5-8gb").extra  # never on where the host says off


def test_runtime_on_a_zero_profile_loads_plain(tiny_models_dir):
    from hublab.runtime.engine.runtime import Runtime

    with Runtime(models_dir=tiny_models_dir, profile="pi-zero-2w", threads=1) as rt:
        assert not rt.weights.extra
        name = sorted(rt.models)[0]
        base = rt.load(name)
        assert base.llama.model_params.use_extra_bufts is False
