"""Faults around a real install: two `pkg install` processes at once (the store lock serialises them and
both end well), a disk that fills up mid-install and a read-only card (a small tmpfs mounted here, skipped
where this machine cannot mount): one clear line, and the installed version is never lost."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import time

import pytest

from hublab.cli import main
from hublab.runtime import pkg
from hublab.runtime.errors import HublabError

from test_pkg_support import base_package, expert_package, oci_registry, snapshot, ws  # noqa: F401

# A child that imports everything, says "ready", waits for "go" on stdin and then installs: two of them
# released together really do race for the store.
CHILD = r"""
import json, sys, time
from hublab.runtime import pkg
from hublab.runtime.errors import HublabError
ref, registry, models = sys.argv[1:4]
print("ready", flush=True)
sys.stdin.readline()
t = time.monotonic()
try:
    r = pkg.install(ref, registry, models_dir=models, profile="host")
    out = {"status": r.status, "version": r.version, "downloaded": r.downloaded}
except HublabError as exc:
    out = {"status": "error", "error": str(exc)}
out |= {"start": t, "end": time.monotonic()}
print(json.dumps(out), flush=True)
"""


def _big(ws, name: str, version: str, seed: int, model: str | None = None):
    """A package with a real GGUF and ~6 MB of weight-like shards (so an install takes a while)."""
    d = base_package(ws.root / f"src-{name}-{version}", name=name, model=model or f"{name}-model", version=version,
                     quants=("q4_k_m",), seed=seed)
    rng = random.Random(seed)
    for i in range(4):
        (d / f"shard-{i}.bin").write_bytes(rng.randbytes(1_500_000 + i))
    pkg.build(d, key=ws.key)
    return d


def _race(jobs: list[tuple[str, str]], models) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, ref, reg, str(models)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for ref, reg in jobs]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in stderr, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_two_installs_at_once(ws, oci_registry):
    remote = f"{oci_registry}/{ws.root.name.lower().replace('_', '-')}"
    for name, version, seed in (("big", "1", 1), ("big", "2", 2), ("other", "1", 3)):
        d = _big(ws, name, version, seed)
        for reg in (str(ws.registry), remote):
            pkg.publish(d, reg, tag=version)
    ws.models.mkdir()
    rounds = []
    for reg in (str(ws.registry), remote):
        models = ws.models / reg.rsplit("/", 1)[-1]
        # The same package twice: one installs, the other waits on the lock and then finds it intact.
        a, b = _race([("big:1", reg), ("big:1", reg)], models)
        assert sorted(r["status"] for r in (a, b)) == ["installed", "unchanged"], (a, b)
        first, second = sorted((a, b), key=lambda r: r["end"])
        assert first["status"] == "installed" and second["downloaded"] == 0
        rounds.append(second["end"] - first["start"])
        # An update and another package at once: both go through, one after the other.
        a, b = _race([("big:2", reg), ("other:1", reg)], models)
        assert (a["status"], b["status"]) == ("updated", "installed"), (a, b)
        # Two installs of different versions (2 is in place): under the lock one runs after the other,
        # so the one that finishes last has updated, and its version is what stays, whole.
        a, b = _race([("big:1", reg), ("big:2", reg)], models)
        last = max((a, b), key=lambda r: r["end"])
        assert last["status"] == "updated" and {a["status"], b["status"]} <= {"updated", "unchanged"}, (a, b)
        v = pkg.verify(models_dir=models)
        assert v.ok and not v.recovered, v.to_dict()
        assert {r.name: r.version for r in pkg.list_packages(models_dir=models)} == {"big": last["version"],
                                                                                    "other": "1"}
        assert not any((models / ".hublab" / "staging").iterdir())
    print(f"\nsame-package race, first start to second end: {[round(t, 2) for t in rounds]} s")


# ---------------------------------------------------------------------------------------------------
# A small disk of our own

@contextlib.contextmanager
def tmpfs(path, size: str):
    """Mount a tmpfs of `size` at `path` for the test (root only); skip where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path, leave_pages: int = 0) -> None:
    """Write `path` until the disk is full, then give back `leave_pages` pages (tmpfs counts pages)."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    size = os.path.getsize(path) // 4096 * 4096
    os.truncate(path, size)
    while os.statvfs(path).f_bavail < leave_pages:
        size -= 4096
        os.truncate(path, size)
    assert os.statvfs(path).f_bavail == leave_pages


@pytest.mark.parametrize("when", ["downloading", "staging"])
def test_disk_full_during_an_update_keeps_the_installed_version(ws, when, capsys):
    for version, seed in (("1", 1), ("2", 2)):
        pkg.publish(_big(ws, "big", version, seed), str(ws.registry), tag=version)
    disk = tmpfs(ws.root / "disk", "20m")
    with disk:
        models = ws.root / "disk" / "models"
        pkg.install("big:1", str(ws.registry), models_dir=models, profile="host")
        before = snapshot(models)
        filler = ws.root / "disk" / "filler"
        state = {"filled": False}

        def fill_up(label: str, done: int, total: int) -> None:
            # downloading: the disk fills after the first MiB of the first file; staging: as the last
            # (small) file starts, leaving it the one page it needs, so writing the install record fails
            if state["filled"]:
                return
            if when == "downloading" and done > 0:
                state["filled"] = True
                _fill(filler)
            elif when == "staging" and label.startswith("[6/6]"):
                assert total < 4096, label
                state["filled"] = True
                _fill(filler, leave_pages=1)

        t0 = time.monotonic()
        with pytest.raises(HublabError) as e:
            pkg.install("big:2", str(ws.registry), models_dir=models, profile="host", progress=fill_up)
        took = time.monotonic() - t0
        msg = str(e.value)
        assert state["filled"] and "\n" not in msg and "No space left on device" in msg, msg
        assert "the disk is full: free some space" in msg
        # The installed version is whole, nothing is left in staging, and verify says so.
        assert snapshot(models) == before
        v = pkg.verify(models_dir=models)
        assert v.ok and [(p.name, p.version) for p in v.packages] == [("big", "1")], v.to_dict()
        assert not any((models / ".hublab" / "staging").iterdir())
        # With the disk full, the next try is refused before it downloads anything.
        _fill(ws.root / "disk" / "filler2")  # what a failed staging freed, taken again
        rc = main(["pkg", "install", "big:2", "--registry", str(ws.registry), "--models-dir", str(models),
                   "--profile", "host"])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "free some space" in err, err
        # Space freed: the update completes (resuming what was downloaded before the disk filled).
        filler.unlink()
        (ws.root / "disk" / "filler2").unlink()
        r = pkg.install("big:2", str(ws.registry), models_dir=models, profile="host")
        assert r.status == "updated" and pkg.verify(models_dir=models).ok
        print(f"\ndisk full while {when}: refused in {took:.2f} s; the retry reused {r.reused} bytes, "
              f"downloaded {r.downloaded}")
        if when == "downloading":
            assert r.reused > 0  # the partial download survived the full disk
        else:
            assert r.reused == r.size and r.downloaded == 0  # the downloads went back to the cache


def test_read_only_models_dir(ws, capsys):
    for version, seed in (("1", 1), ("2", 2)):
        pkg.publish(_big(ws, "big", version, seed), str(ws.registry), tag=version)
    with tmpfs(ws.root / "card", "20m") as card:
        models = card / "models"
        pkg.install("big:1", str(ws.registry), models_dir=models, profile="host")
        subprocess.run(["mount", "-o", "remount,ro", str(card)], check=True)
        try:
            for argv in (["install", "big:2", "--registry", str(ws.registry), "--profile", "host"],
                         ["remove", "big"]):
                rc = main(["pkg", *argv, "--models-dir", str(models)])
                err = capsys.readouterr().err
                assert rc == 1 and err.count("\n") == 1 and "Read-only file system" in err, err
                assert "remount it read-write" in err
            assert main(["pkg", "verify", "--models-dir", str(models)]) == 0  # checked, not repaired
            assert "big 1: ok" in capsys.readouterr().out
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(card)], check=True)
        assert pkg.list_packages(models_dir=models)[0].version == "1"
