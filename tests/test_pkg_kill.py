"""kill -9 during install/update at spread-out random moments: the store is always the old package or
the new one (after `pkg verify`'s recovery), every file re-hashes clean, and the runtime's model scan
sees each model exactly once."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from hublab.runtime import pkg
from hublab.runtime.config import scan_models

from test_pkg_support import base_package, oci_registry, ws  # noqa: F401

RUNS = int(os.environ.get("HUBLAB_TEST_KILL_RUNS", "20"))  # raise it locally to soak
CHILD = r"""
import os, sys, time
from hublab.runtime import pkg
if os.environ.get("HUBLAB_TEST_NO_EXCHANGE"):
    pkg._exchange = lambda a, b: False  # exercise the two-rename commit and its recovery
ref, registry, models = sys.argv[1:4]
print("go", flush=True)
t = time.monotonic()
r = pkg.install(ref, registry, models_dir=models, profile="host")
print("done", r.version, time.monotonic() - t, flush=True)
"""


def _make_version(ws, version: str, seed: int):
    """A base package with a real GGUF and a few MB of extra weights-like data, different per version."""
    d = base_package(ws.root / f"src-{version}", name="big", model="big-model", version=version,
                     quants=("q4_k_m",), seed=seed)
    rng = random.Random(seed)
    for i in range(5):
        (d / f"shard-{i}.bin").write_bytes(rng.randbytes(1_500_000 + i * 1000))
    pkg.build(d, key=ws.key)
    return d


def _child(ref: str, registry: str, models, no_exchange: bool) -> subprocess.Popen:
    env = dict(os.environ)
    if no_exchange:
        env["HUBLAB_TEST_NO_EXCHANGE"] = "1"
    p = subprocess.Popen([sys.executable, "-c", CHILD, ref, registry, str(models)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "go", p.stderr.read()
    return p


def _calibrate(registry: str, models, ref: str) -> float:
    p = _child(ref, registry, models, False)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return float(out.split()[-1])


def test_kill_9_during_install_leaves_old_or_new(ws, oci_registry):
    remote = f"{oci_registry}/{ws.root.name.lower().replace('_', '-')}"
    for version, seed in (("1", 11), ("2", 22)):
        d = _make_version(ws, version, seed)
        for reg in (str(ws.registry), remote):
            pkg.publish(d, reg, tag=version)
    ws.models.mkdir()
    registries = [str(ws.registry), remote]
    scratch = ws.root / "calibrate"
    budget = {reg: _calibrate(reg, scratch / str(i), "big:1") for i, reg in enumerate(registries)}
    rng = random.Random(int(os.environ.get("HUBLAB_TEST_KILL_SEED", "1234")))
    outcomes = {"finished": 0, "killed, old kept": 0, "killed, new in place": 0, "killed, nothing yet": 0}
    installed = None  # version in the store before each run
    t0 = time.monotonic()
    for i in range(RUNS):
        # Four runs in five update an installed version; every fifth is a fresh install.
        if i % 5 == 4 and installed:
            pkg.remove("big", models_dir=ws.models)
            installed = None
        elif i % 5 != 4 and not installed:
            installed = pkg.install("big:2", str(ws.registry), models_dir=ws.models, profile="host").version
        target = "2" if installed == "1" else "1"
        reg = registries[i % 2]
        # Stratified over the measured install time (plus a margin), so kills land in every phase.
        delay = (i + rng.random()) / RUNS * budget[reg] * 1.3
        p = _child(f"big:{target}", reg, ws.models, no_exchange=bool(i % 3 == 1))
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        finished = p.returncode == 0
        v = pkg.verify(models_dir=ws.models)
        assert v.ok, (i, v.to_dict())
        now = {r.name: r.version for r in pkg.list_packages(models_dir=ws.models)}.get("big")
        assert now in ({installed, target} if installed else {None, target}), (i, installed, target, now)
        catalog = scan_models(ws.models)
        assert not catalog.errors, (i, catalog.errors)
        assert set(catalog.models) == ({"big-model"} if now else set()), (i, sorted(catalog.models))
        staging = ws.models / ".hublab" / "staging"
        leftovers = [e.name for e in staging.iterdir()] if staging.exists() else []
        assert leftovers == [], (i, leftovers)
        if finished:
            outcomes["finished"] += 1
        elif now == installed and installed:
            outcomes["killed, old kept"] += 1
        elif now == target:
            outcomes["killed, new in place"] += 1
        else:
            outcomes["killed, nothing yet"] += 1
        installed = now
    elapsed = time.monotonic() - t0
    print(f"\n{RUNS} kill -9 runs in {elapsed:.1f} s (install takes {budget}): {outcomes}")
    # The spread must have hit installs in flight, not only before start or after the end.
    assert outcomes["finished"] < RUNS and outcomes["finished"] + outcomes["killed, new in place"] > 0
    # And the store still works: finish with a clean update to whichever version is not installed.
    last = pkg.install(f"big:{'2' if installed == '1' else '1'}", str(ws.registry), models_dir=ws.models,
                       profile="host")
    assert last.status in ("installed", "updated") and pkg.verify(models_dir=ws.models).ok
