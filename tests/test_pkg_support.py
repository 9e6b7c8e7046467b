"""Fixtures for the package tests: a real OCI registry (Debian docker-registry) on loopback, a
workspace with its own system.toml and trusted signing key, and tiny real packages (llama GGUFs
and LoRA adapter GGUFs written with gguf-py). Imported by test_pkg*.py and test_deploy.py."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ggufs import write_lora_adapter, write_model_toml, write_tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"
REGISTRY_USER, REGISTRY_PASSWORD = "hublab", "hublab-test-pw"  # matches fixtures/registry.htpasswd
QUANTS = {"q2_k": ("Q2_K", 32), "q4_k_m": ("Q4_K_M", 64), "q8_0": ("Q8_0", 128)}  # variant: (quant, n_embd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_registry(workdir: Path, config: Path, extra_env: dict[str, str] | None = None):
    """Start docker-registry on a free loopback port with `config`; yield its URL; stop it."""
    import httpx

    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("docker-registry is not installed (scripts/test installs it: apt-get install docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, REGISTRY_HTTP_ADDR=f"127.0.0.1:{port}", REGISTRY_HTTP_SECRET="hublab-test",
               REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(workdir / "data"))
    env.update(extra_env or {})
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen([exe, "serve", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                if httpx.get(url + "/v2/", timeout=1).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start: " + (workdir / "registry.log").read_text()[-500:])
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """URL of a real OCI registry (no auth) for this test session."""
    with run_registry(tmp_path_factory.mktemp("oci"), FIXTURES / "registry.yml") as url:
        yield url


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    """URL of a real OCI registry that wants htpasswd basic auth."""
    with run_registry(tmp_path_factory.mktemp("oci-auth"), FIXTURES / "registry-auth.yml",
                      {"REGISTRY_AUTH_HTPASSWD_PATH": str(FIXTURES / "registry.htpasswd")}) as url:
        yield url


@dataclass
class Workspace:
    root: Path
    config: Path
    models: Path
    registry: Path      # a directory registry
    key: Path
    public_key: str


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    """A device: system.toml (models_dir, trusted key), a signing key, an empty directory registry."""
    from hublab.runtime import pkg

    config = tmp_path / "system.toml"
    config.write_text('[runtime]\nmodels_dir = "models"\n')
    monkeypatch.setenv("HUBLAB_CONFIG", str(config))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    for var in ("HUBLAB_REGISTRY_USERNAME", "HUBLAB_REGISTRY_PASSWORD", "HUBLAB_REGISTRY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    key = pkg.keygen(tmp_path / "signing.key", trust=True)
    return Workspace(root=tmp_path, config=config, models=tmp_path / "models", registry=tmp_path / "registry",
                     key=tmp_path / "signing.key", public_key=key["public_key"])


def base_package(directory: Path, *, name: str = "tiny", model: str = "tiny", version: str = "1.0",
                 quants=("q2_k", "q4_k_m", "q8_0"), seed: int = 0, description: str = "a tiny llama") -> Path:
    """Source dir of a base-model package: one llama GGUF + model TOML per quantization variant."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[package]", f'name = "{name}"', f'version = "{version}"', 'category = "base"',
             f'description = "{description}"', 'license = "Apache-2.0"', 'requires = ">=0.1"']
    for v in quants:
        quant, n_embd = QUANTS[v]
        (directory / v).mkdir(exist_ok=True)
        write_tiny_llama(directory / v / f"{model}.gguf", n_embd=n_embd, n_ff=2 * n_embd, seed=seed)
        write_model_toml(directory / v / f"{model}.toml", model, gguf_path=Path(f"{model}.gguf"), context_size=128)
        lines += ["", "[[variants]]", f'name = "{v}"', f'quant = "{quant}"']
    (directory / "package.toml").write_text("\n".join(lines) + "\n")
    return directory


def expert_package(directory: Path, base_gguf: Path, *, name: str = "alpha-expert", expert: str = "alpha",
                   base: str = "tiny", version: str = "1.0", seed: int = 1) -> Path:
    """Source dir of an expert package: expert TOML + LoRA adapter GGUF for `base`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_lora_adapter(base_gguf, directory / f"{expert}.gguf", seed=seed, scale=0.3)
    write_model_toml(directory / f"{expert}.toml", expert, base=base, adapter=Path(f"{expert}.gguf"))
    (directory / "package.toml").write_text(
        f'[package]\nname = "{name}"\nversion = "{version}"\ncategory = "expert"\ndescription = "the {expert} '
        'expert"\n')
    return directory


def snapshot(models: Path) -> dict[str, str]:
    """Every file under a models dir (the store's private .hublab excluded) -> sha256."""
    out = {}
    if models.is_dir():
        for p in sorted(models.rglob("*")):
            if p.is_file() and ".hublab" not in p.relative_to(models).parts:
                out[p.relative_to(models).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def push_raw(registry: str, name: str, tags: list[str], package_raw: bytes, files: dict[str, bytes],
             sign_with: Path | None = None, tmp: Path | None = None) -> None:
    """Publish arbitrary (possibly malicious) package content the way a hostile publisher could."""
    import tempfile

    from hublab.runtime.pkg.manifest import digest_bytes
    from hublab.runtime.pkg.registry import (ANN_SIGNATURE, ANN_TITLE, MEDIA_CONFIG, MEDIA_FILE, Descriptor,
                                             DirRegistry, oci_manifest, open_registry)
    from hublab.runtime.pkg.signing import sign_digest

    reg = open_registry(registry)
    if isinstance(reg, DirRegistry):
        reg.init()
    with tempfile.TemporaryDirectory(dir=tmp) as t:
        layers = []
        for i, (path, data) in enumerate(files.items()):
            src = Path(t) / f"f{i}"
            src.write_bytes(data)
            desc = Descriptor(MEDIA_FILE, digest_bytes(data), len(data), {ANN_TITLE: path})
            reg.push_blob(name, desc, src)
            layers.append(desc)
        cfg = Path(t) / "package.toml"
        cfg.write_bytes(package_raw)
        reg.push_blob(name, Descriptor(MEDIA_CONFIG, digest_bytes(package_raw), len(package_raw)), cfg)
    ann = {}
    if sign_with:
        ann[ANN_SIGNATURE] = sign_digest(sign_with, digest_bytes(package_raw)).to_json()
    reg.push_manifest(name, tags, oci_manifest(package_raw, layers, ann))
    reg.close()


def manifest_text(name: str, files: dict[str, bytes], *, version: str = "1.0", category: str = "base",
                  extra: str = "", paths: dict[str, str] | None = None) -> bytes:
    """A package.toml for `files` (path -> content); `paths` renames entries to forge traversal."""
    lines = ["[package]", f'name = "{name}"', f'version = "{version}"', f'category = "{category}"', extra]
    for path, data in files.items():
        lines += ["[[files]]", "path = " + json.dumps((paths or {}).get(path, path)), 'role = "data"',
                  f"size = {len(data)}",
                  f'sha256 = "{hashlib.sha256(data).hexdigest()}"']
    return ("\n".join(lines) + "\n").encode()
