"""kill -9 during install/update at spread-out random moments: the store is always the old package or
the new one (after `pkg verify`'s recovery), every file re-hashes clean, and the runtime's model scan
sees each model exactly once. `pkg update` is killed the same way (a moving `latest` tag), with the
recoveries and the time they take measured; the ≥50-run soak is marked slow."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from hublab.runtime import pkg
from hublab.runtime.config import scan_models

from test_pkg_support import base_package, oci_registry, ws  # noqa: F401

RUNS = int(os.environ.get("HUBLAB_TEST_KILL_RUNS", "20"))  # raise it locally to soak
CHILD = r"""
import os, sys, time
from hublab.runtime import pkg
from hublab.runtime.pkg import store
if os.environ.get("HUBLAB_TEST_NO_EXCHANGE"):
    store.exchange = lambda a, b: False  # exercise the two-rename commit and its recovery
verb, ref, registry, models = sys.argv[1:5]
print("go", flush=True)
t = time.monotonic()
if verb == "update":  # what `hublab pkg update NAME` runs
    [r] = pkg.update([ref], registry, models_dir=models, profile="host")
    assert r.status == "updated", r
    version = r.new_version
else:
    version = pkg.install(ref, registry, models_dir=models, profile="host").version
print("done", version, time.monotonic() - t, flush=True)
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


def _child(ref: str, registry: str, models, no_exchange: bool, verb: str = "install") -> subprocess.Popen:
    env = dict(os.environ)
    if no_exchange:
        env["HUBLAB_TEST_NO_EXCHANGE"] = "1"
    p = subprocess.Popen([sys.executable, "-c", CHILD, verb, ref, registry, str(models)], env=env,
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


def _point_latest(registry: str, version: str) -> None:
    """Move big:latest to `version` (what a publisher does when releasing it)."""
    from hublab.runtime.pkg.registry import open_registry, resolve

    reg = open_registry(registry)
    try:
        reg.push_manifest("big", ["latest"], resolve(reg, "big", version).oci_raw)
    finally:
        reg.close()


@pytest.mark.parametrize("runs", [int(os.environ.get("HUBLAB_TEST_KILL_UPDATE_RUNS", "10")),
                                  pytest.param(50, marks=pytest.mark.slow, id="soak-50")])
def test_kill_9_during_pkg_update(ws, oci_registry, runs):
    """`pkg update` follows a moving tag; killed anywhere, verify recovers old or new, whole."""
    remote = f"{oci_registry}/{ws.root.name.lower().replace('_', '-')}"
    registries = [str(ws.registry), remote]
    for version, seed in (("1", 11), ("2", 22)):
        d = _make_version(ws, version, seed)
        for reg in registries:
            pkg.publish(d, reg, tag=version)
    budget = {}
    for i, reg in enumerate(registries):  # how long one update takes from each registry
        models = ws.root / "calibrate" / str(i)
        _point_latest(reg, "1")
        pkg.install("big:latest", reg, models_dir=models, profile="host")
        _point_latest(reg, "2")
        p = _child("big", reg, models, False, verb="update")
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        budget[reg] = float(out.split()[-1])
    rng = random.Random(int(os.environ.get("HUBLAB_TEST_KILL_SEED", "4321")))
    outcomes = {"finished": 0, "killed, old kept": 0, "killed, new in place": 0}
    recoveries, recover_s = 0, []
    _point_latest(registries[0], "1")
    installed = pkg.install("big:latest", registries[0], models_dir=ws.models, profile="host").version
    t0 = time.monotonic()
    for i in range(runs):
        reg = registries[i % 2]
        target = "2" if installed == "1" else "1"
        _point_latest(reg, target)
        delay = (i + rng.random()) / runs * budget[reg] * 1.3
        p = _child("big", reg, ws.models, no_exchange=bool(i % 3 == 1), verb="update")
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        finished = p.returncode == 0
        assert finished or p.returncode == -signal.SIGKILL, err
        t = time.monotonic()
        v = pkg.verify(models_dir=ws.models)
        recover_s.append(time.monotonic() - t)
        recoveries += bool(v.recovered)
        assert v.ok, (i, v.to_dict())
        now = {r.name: r.version for r in pkg.list_packages(models_dir=ws.models)}.get("big")
        assert now in {installed, target}, (i, installed, target, now)
        assert finished <= (now == target)
        catalog = scan_models(ws.models)
        assert not catalog.errors and set(catalog.models) == {"big-model"}, (i, catalog.errors)
        staging = ws.models / ".hublab" / "staging"
        assert not any(staging.iterdir()), (i, [e.name for e in staging.iterdir()])
        outcomes["finished" if finished else "killed, new in place" if now == target else "killed, old kept"] += 1
        installed = now
    elapsed = time.monotonic() - t0
    print(f"\n{runs} kill -9 runs of pkg update in {elapsed:.1f} s (an update takes "
          f"{ {k.rsplit('/', 1)[-1]: round(v, 2) for k, v in budget.items()} } s): {outcomes}; "
          f"verify recovered {recoveries} interrupted updates, slowest recovery {max(recover_s) * 1000:.0f} ms, "
          f"median {sorted(recover_s)[len(recover_s) // 2] * 1000:.0f} ms")
    assert outcomes["finished"] < runs and outcomes["killed, old kept"] + outcomes["killed, new in place"] > 0
    # The store still updates cleanly afterwards.
    _point_latest(registries[0], "2" if installed == "1" else "1")
    [r] = pkg.update(["big"], registries[0], models_dir=ws.models, profile="host")
    assert r.status == "updated" and pkg.verify(models_dir=ws.models).ok
