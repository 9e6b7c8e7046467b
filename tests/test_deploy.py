"""`hublab deploy`: the tree a Pi boots with, for a chosen board, verified; a FAT32 image of it."""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from hublab.cli import main
from hublab.runtime import pkg
from hublab.runtime.pkg import deploy
from hublab.runtime.config import load_system, scan_models
from hublab.runtime.errors import HublabError

from test_pkg_support import base_package, expert_package, snapshot, ws  # noqa: F401


@pytest.fixture
def published(ws):
    base = base_package(ws.root / "src" / "tiny")
    pkg.build(base, key=ws.key)
    # The expert adapter is made for the Q4_K_M base, the variant a Pi 4 gets.
    expert = expert_package(ws.root / "src" / "alpha", base / "q4_k_m" / "tiny.gguf")
    pkg.build(expert, key=ws.key)
    for d in (base, expert):
        pkg.publish(d, str(ws.registry))
    return ws.registry


def test_deploy_writes_a_bootable_verified_tree(ws, published, tmp_path):
    card = tmp_path / "card"
    r = deploy.deploy(card, ["tiny", "alpha-expert:1.0"], profile="pi4-4gb", registry=str(published))
    assert r.profile == "pi4-4gb" and [p["variant"] for p in r.packages] == ["q4_k_m", ""]
    assert (card / "models" / "packages" / "tiny" / "q4_k_m" / "tiny.gguf").is_file()
    assert (card / "models" / "experts" / "alpha-expert" / "alpha.gguf").is_file()
    assert r.experts == ["alpha"] and r.models == ["alpha", "tiny"] and len(r.checks) == 3
    system = load_system(card / "system.toml")
    assert system.models_dir == card / "models" and system.profile == "pi4-4gb"
    assert system.trusted_keys == [ws.public_key]  # the Pi can verify later updates itself
    assert pkg.verify(models_dir=card / "models").ok
    # The runtime on the card's config runs the expert.
    from hublab.runtime.engine.runtime import Runtime

    with Runtime(models_dir=system.models_dir, profile="host", threads=1) as rt:
        assert rt.generate("alpha", "the model", raw=True, max_tokens=4).tokens == 4
    # Deploying again is idempotent and keeps settings made on the card.
    text = (card / "system.toml").read_text().replace('[runtime]', '[moe]\nrouting = "single"\n\n[runtime]')
    (card / "system.toml").write_text(text)
    again = deploy.deploy(card, ["tiny"], profile="pi4-4gb", registry=str(published))
    assert again.packages[0]["status"] == "unchanged" and load_system(card / "system.toml").routing == "single"


def test_deploy_picks_the_variant_for_the_board(ws, published, tmp_path):
    r = deploy.deploy(tmp_path / "zero", ["tiny"], profile="pi5-16gb", registry=str(published))
    assert r.packages[0]["variant"] == "q8_0"


def test_deploy_refuses_host_profile_and_bad_packages_leave_no_card_models(ws, published, tmp_path, capsys):
    with pytest.raises(HublabError, match="deploy needs a board profile"):
        deploy.deploy(tmp_path / "c", ["tiny"], profile="host", registry=str(published))
    rc = main(["deploy", "--to", str(tmp_path / "c2"), "--profile", "pi4-4gb", "--registry", str(published), "nope"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("hublab: error: nope:latest not found") and err.count("\n") == 1
    assert snapshot(tmp_path / "c2" / "models") == {}


def test_deploy_verification_catches_a_broken_tree(ws, published, tmp_path):
    # An expert whose base is not on the card would fail on the Pi: deploy says so instead, and takes
    # back what it wrote; a card that already had the base keeps it.
    with pytest.raises(HublabError, match="the Pi would report: .*no model named 'tiny'"):
        deploy.deploy(tmp_path / "c", ["alpha-expert"], profile="pi4-4gb", registry=str(published))
    assert snapshot(tmp_path / "c" / "models") == {} and not (tmp_path / "c" / "system.toml").exists()
    deploy.deploy(tmp_path / "d", ["tiny"], profile="pi4-4gb", registry=str(published))
    before = snapshot(tmp_path / "d" / "models")
    with pytest.raises(HublabError, match="nope:latest not found"):
        deploy.deploy(tmp_path / "d", ["alpha-expert", "nope"], profile="pi4-4gb", registry=str(published))
    assert snapshot(tmp_path / "d" / "models") == before  # refused before anything was written


@pytest.mark.skipif(shutil.which("mformat") is None, reason="mtools not installed (scripts/test installs it)")
def test_deploy_fat32_image(ws, published, tmp_path, capsys):
    card, image = tmp_path / "card", tmp_path / "card.img"
    rc = main(["deploy", "--to", str(card), "--profile", "pi-zero-2w", "--registry", str(published),
               "--image", str(image), "tiny", "alpha-expert"])
    out = capsys.readouterr().out
    assert rc == 0 and "deployed 2 packages for pi-zero-2w" in out and "export HUBLAB_CONFIG=" in out
    info = subprocess.run(["minfo", "-i", str(image), "::"], capture_output=True, text=True).stdout
    assert "FAT32" in info or "fat32" in info.lower()
    # Files read back from the image equal the tree (mcopy back every file; system.toml and a GGUF here).
    for rel in ("system.toml", "models/packages/tiny/q4_k_m/tiny.gguf"):
        back = tmp_path / "back"
        subprocess.run(["mcopy", "-n", "-i", str(image), f"::/{rel}", str(back)], check=True)
        assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256((card / rel).read_bytes()).digest()
        back.unlink()
    assert scan_models(card / "models").errors == []
