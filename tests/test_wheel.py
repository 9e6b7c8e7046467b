"""The wheel, as a user gets it: `pip wheel .`, installed into a fresh venv, run from outside the checkout.

The fresh venv gets hublab from the wheel alone (`pip install --no-deps`). Its dependencies come from this
venv's site-packages through a plain path line in a .pth file, after the venv's own site-packages: pip
would otherwise compile llama-cpp-python for minutes or need the network, and a plain path line runs no
other .pth file, so this checkout's editable-install hook never maps `hublab` back to the repo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _site_packages(venv: Path) -> Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                                                              "print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("hublab-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, cwd=tmp)
    site = _site_packages(venv)
    (site / "zz_hublab_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    home = tmp / "user"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBLAB_")}
    env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"),
               XDG_STATE_HOME=str(home / "state"), OMP_NUM_THREADS="1")
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return {"wheel": wheel, "venv": venv, "site": site, "home": home, "env": env, "cwd": cwd}


def run(installed: dict, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p


def test_wheel_ships_the_embedded_set_and_declares_its_dependencies(installed):
    with zipfile.ZipFile(installed["wheel"]) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for path in ("hublab/__main__.py", "hublab/data/models/gemma3-270m.toml", "hublab/data/models/experts/python.toml",
                 "hublab/data/models/demo/python.gguf", "hublab/data/models/demo/python-knowledge.jsonl",
                 "hublab/data/models/router/model.onnx", "hublab/data/models/router/tokenizer.json",
                 "hublab/data/hardware-profiles/pi4-4gb.toml", "hublab/data/packaging/package.schema.json",
                 "hublab/data/packaging/hublab-agent.service", "hublab/data/packaging/hublab-rpc-worker.service",
                 "hublab/runtime/pkg/install.py", "hublab/runtime/engine/split.py", "hublab/runtime/serve/http_base.py",
                 "hublab/runtime/routing/ensemble.py"):
        assert path in names, path
    assert not [n for n in names if "/.hublab" in n or n.endswith(".png")]
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any("tomlkit" in r for r in requires) and any(r.startswith("Requires-Dist: packaging") for r in requires)
    assert all("python_version < \"3.11\"" in r for r in requires if "tomli" in r and "tomlkit" not in r)


def test_installed_wheel_lists_and_answers_from_anywhere(installed):
    venv, site, home = installed["venv"], installed["site"], installed["home"]
    where = run(installed, str(venv / "bin" / "python"), "-c",
                "import hublab, hublab.runtime.paths as p; print(hublab.__file__); print(p.EMBEDDED_MODELS_DIR)")
    module, embedded = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(embedded).is_relative_to(site)
    shipped = sorted(p for p in (site / "hublab" / "data").rglob("*"))

    listing = run(installed, str(venv / "bin" / "hublab"), "list")
    for name in ("gemma3-270m", "python", "rust", "system", "ai", "general"):
        assert name in listing.stdout
    info = json.loads(run(installed, str(venv / "bin" / "hublab"), "shell", "--json", "-c", "ai info").stdout)
    assert info["result"]["models_dir"] == str(home / "data" / "hublab" / "models")
    assert info["result"]["experts"] == 5

    answer = run(installed, str(venv / "bin" / "python"), "-m", "hublab", "run", "python", "What is pip?",
                 "--max-tokens", "1")
    assert answer.stdout.strip()
    assert "CPU_REPACK" not in answer.stderr  # llama.cpp's log went to the state dir
    assert (home / "state" / "hublab" / "llama.log").is_file()
    # nothing was written into the installed package
    assert sorted(p for p in (site / "hublab" / "data").rglob("*")) == shipped
