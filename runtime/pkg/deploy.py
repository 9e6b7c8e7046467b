"""`hublab deploy`: write the tree a Pi boots with, for one board, onto an SD card (or a FAT32 image).

    DIR/system.toml            [runtime] models_dir = "models", profile = <board>; [trust] keys
    DIR/models/packages/<n>/   base models
    DIR/models/experts/<n>/    experts
    DIR/models/router/         the router

Packages are installed with the same transaction as `pkg install` (board fit, signatures, sha256), so
the Pi can later `pkg verify` and `pkg update` them. Before anything is written every package passes
install's manifest checks; after writing, the tree is checked: every file re-hashed, system.toml
loaded, every model TOML scanned (an expert whose base is not on the card fails here), and on a
failure the packages this deploy added are removed again. On the Pi, point HUBLAB_CONFIG at
DIR/system.toml (models_dir is relative to it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import dump_toml, format_size, load_system, read_toml, scan_models
from ..errors import HublabError
from .manifest import sha256_file
from ..engine.profiles import Profile, board_profiles, resolve_profile
from .registry import Progress


class DeployError(HublabError):
    pass


@dataclass
class DeployResult:
    to: str
    profile: str
    system_toml: str
    packages: list[dict]
    experts: list[str]
    models: list[str]
    files: int
    size: int
    image: str = ""
    checks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _board(profile: Profile | str | None, config: Path | None) -> Profile:
    if isinstance(profile, Profile):
        return profile
    system = load_system(config)
    p = resolve_profile(profile, system.profile)
    if p.name == "host":
        boards = ", ".join(board_profiles())
        raise DeployError(f"deploy needs a board profile, not this host; pass --profile (one of {boards})")
    return p


def _system_toml(path: Path, board: str, trusted: list[str]) -> None:
    """Write (or update) the card's system.toml, keeping settings a previous deploy or the user set."""
    data = read_toml(path)[0] if path.exists() else {}
    data.setdefault("runtime", {}).update({"models_dir": "models", "profile": board})
    if trusted:
        keys = list(data.get("trust", {}).get("keys", []))
        data.setdefault("trust", {})["keys"] = keys + [k for k in trusted if k not in keys]
    tmp = path.with_name(".system.toml.tmp")
    tmp.write_text("# Written by hublab deploy. On the Pi: export HUBLAB_CONFIG=<this file>\n" + dump_toml(data))
    os.replace(tmp, path)


def deploy(to: str | Path, packages: list[str], *, profile: Profile | str | None = None,
           registry: str | Path | None = None, allow_unsigned: bool = False, image: str | Path | None = None,
           progress: Progress | None = None, config: str | Path | None = None) -> DeployResult:
    """Install `packages` for one board into DIR/models, write DIR/system.toml, verify; optionally a FAT32 image."""
    from .. import pkg

    if not packages:
        raise DeployError("name at least one package to deploy (e.g. hublab deploy --to /media/sd base-model experts)")
    cfg = Path(config) if config else None
    board = _board(profile, cfg)
    root = Path(to).expanduser()
    models = root / "models"
    trusted = load_system(cfg).trusted_keys
    for ref in packages:  # a bad package is refused before the card is touched
        pkg.check(ref, registry, profile=board, allow_unsigned=allow_unsigned, trusted_keys=trusted, config=cfg)
    models.mkdir(parents=True, exist_ok=True)
    results = []
    system_path = root / "system.toml"
    had_system = system_path.exists()
    try:
        for ref in packages:
            results.append(pkg.install(ref, registry, models_dir=models, profile=board, allow_unsigned=allow_unsigned,
                                       trusted_keys=trusted, progress=progress, config=cfg))
        _system_toml(system_path, board.name, trusted)
        checks = verify_tree(root, [r.name for r in results])
    except HublabError:
        # Leave the card as it was found: what this deploy added goes; updated packages keep their
        # new, verified version (the old one is not kept once an update lands).
        for r in results:
            if r.status == "installed":
                pkg.remove(r.name, models_dir=models, config=cfg)
        if not had_system:
            system_path.unlink(missing_ok=True)
        raise
    out = DeployResult(to=str(root), profile=board.name, system_toml=str(system_path),
                       packages=[r.to_dict() for r in results],
                       experts=sorted({e for r in results for e in r.experts}),
                       models=sorted(scan_models(models).models), files=0, size=0, checks=checks)
    files = [p for p in root.rglob("*") if p.is_file() and ".hublab" not in p.relative_to(root).parts]
    out.files, out.size = len(files), sum(p.stat().st_size for p in files)
    if image:
        out.image = str(write_image(root, Path(image)))
        out.checks.append(f"image {out.image}: {out.files} files read back and matched")
    return out


def deploy_worker(to: str | Path, *, profile: Profile | str | None = None, host: str = "127.0.0.1",
                  port: int = 50052, allow_remote: bool = False, config: str | Path | None = None) -> DeployResult:
    """A worker-only card: system.toml for the board and rpc-worker.env for packaging/hublab-rpc-worker.service
    (`hublab rpc-worker` lends the board's memory to a base split across boards; no models of its own)."""
    from ..engine.rpc import check_host

    board = _board(profile, Path(config) if config else None)
    if not 1 <= port <= 65535:
        raise DeployError(f"--worker-port {port} is not a TCP port; give 1 to 65535")
    check_host(host, allow_remote)
    root = Path(to).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    system_path = root / "system.toml"
    _system_toml(system_path, board.name, [])
    env = root / "rpc-worker.env"
    flags = "--allow-remote" if allow_remote else ""
    env.write_text("# Written by hublab deploy --worker. On the Pi: cp rpc-worker.env /etc/hublab/ and enable\n"
                   "# /opt/hublab/packaging/hublab-rpc-worker.service. ggml-rpc has no authentication: a private "
                   "link only.\n"
                   f"HUBLAB_RPC_HOST={host}\nHUBLAB_RPC_PORT={port}\nHUBLAB_RPC_FLAGS={flags}\n")
    read = dict(line.split("=", 1) for line in env.read_text().splitlines() if line and not line.startswith("#"))
    if read.get("HUBLAB_RPC_HOST") != host or read.get("HUBLAB_RPC_PORT") != str(port):
        raise DeployError(f"{env}: reads back different from what was written; check the disk")
    system = load_system(system_path)
    files = [system_path, env]
    return DeployResult(to=str(root), profile=board.name, system_toml=str(system_path), packages=[], experts=[],
                        models=[], files=len(files), size=sum(p.stat().st_size for p in files),
                        checks=[f"system.toml loads (profile {system.profile})",
                                f"rpc-worker.env: {host}:{port}" + (" (beyond loopback: private link only)"
                                                                    if flags else " (loopback)")])


def verify_tree(root: Path, names: list[str]) -> list[str]:
    """Check a deployed tree the way the Pi will read it; DeployError on the first problem."""
    from .. import pkg

    system = load_system(root / "system.toml")
    models = root / "models"
    if system.models_dir.resolve() != models.resolve():
        raise DeployError(f"{root / 'system.toml'}: models_dir points at {system.models_dir}, not {models}")
    v = pkg.verify(models_dir=models, config=root / "system.toml")
    if not v.ok:
        bad = next((f"{p.name}: {p.problems[0]}" for p in v.packages if not p.ok), None) or v.store_problems[0]
        raise DeployError(f"{root}: written tree failed verification ({bad}); deploy again")
    missing = sorted(set(names) - {p.name for p in v.packages})
    if missing:
        raise DeployError(f"{root}: {missing[0]} is not in the written tree; deploy again")
    catalog = scan_models(models)
    if catalog.errors:
        raise DeployError(f"{root}: the Pi would report: {catalog.errors[0]}")
    return [f"{len(v.packages)} packages re-hashed ({sum(p.files for p in v.packages)} files)",
            f"system.toml loads (profile {system.profile}, models_dir {system.models_dir})",
            f"{len(catalog.models)} models and experts load from the TOMLs"]


# ---------------------------------------------------------------------------------------------------
# FAT32 image with mtools (no root, no loop device)

def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise DeployError(f"{cmd[0]} failed: {msg[-1] if msg else r.returncode}; is mtools installed and the disk not "
                          "full?")


def write_image(tree: Path, image: Path) -> Path:
    """A FAT32 image holding `tree` (for dd onto a card), read back and compared file by file."""
    if not shutil.which("mformat") or not shutil.which("mcopy"):
        raise DeployError("building an image needs mtools; install it (apt-get install mtools) or leave out --image")
    files = [p for p in sorted(tree.rglob("*")) if p.is_file() and ".hublab" not in p.relative_to(tree).parts]
    payload = sum(p.stat().st_size for p in files)
    # FAT32 needs at least 65525 clusters: 512-byte clusters below 256 MiB keep small images small.
    size = max(40 << 20, int(payload * 1.15) + (16 << 20))
    size = (size + (1 << 20) - 1) // (1 << 20) << 20
    image.parent.mkdir(parents=True, exist_ok=True)
    tmp = image.with_name(image.name + ".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
    cluster = ["-c", "1"] if size < (256 << 20) else []
    img = str(tmp)
    _run(["mformat", "-i", img, "-F", *cluster, "-v", "HUBLAB", "-T", str(size // 512), "-h", "64", "-s", "32", "::"])
    dirs = {a for p in files for a in p.relative_to(tree).parents} - {Path(".")}
    dirs = sorted(dirs, key=lambda d: (len(d.parts), d.as_posix()))
    for d in dirs:
        _run(["mmd", "-i", img, "-D", "s", "::/" + d.as_posix()])
    for p in files:
        _run(["mcopy", "-i", img, "-D", "o", str(p), "::/" + p.relative_to(tree).as_posix()])
    with tempfile.TemporaryDirectory() as back:
        for p in files:
            rel = p.relative_to(tree).as_posix()
            out = Path(back) / rel.replace("/", "__")
            _run(["mcopy", "-i", img, "-n", "::/" + rel, str(out)])
            if sha256_file(out) != sha256_file(p):
                raise DeployError(f"{image}: {rel} reads back different from what was written; check the disk")
            out.unlink()
    os.replace(tmp, image)
    return image


# ---------------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("packages", nargs="*", metavar="PACKAGE", help="NAME[:TAG] of packages to put on the card")
    parser.add_argument("--to", required=True, help="directory to write (the mounted card or a staging folder)")
    parser.add_argument("--profile", default=argparse.SUPPRESS, help="board the card is for (e.g. pi4-4gb)")
    parser.add_argument("--registry", help="registry to install from (default: system.toml [registry] url)")
    parser.add_argument("--allow-unsigned", action="store_true", help="accept unsigned or untrusted packages")
    parser.add_argument("--image", help="also write a FAT32 image file of the tree (needs mtools)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    worker = parser.add_argument_group("worker card (a board that lends its memory to a split base; no packages)")
    worker.add_argument("--worker", action="store_true", help="write a card for `hublab rpc-worker` only")
    worker.add_argument("--worker-host", default="127.0.0.1", help="address the worker binds (default 127.0.0.1)")
    worker.add_argument("--worker-port", type=int, default=50052, help="its port (default 50052)")
    worker.add_argument("--allow-remote", action="store_true",
                        help="let it bind beyond loopback (ggml-rpc has no authentication: a private link only)")


def cli(args) -> int:
    from .cli import ProgressBar

    if args.worker:
        if args.packages:
            raise DeployError("a worker card holds no packages (the main board's base names the worker); "
                              "leave out the package names or --worker")
        r = deploy_worker(args.to, profile=getattr(args, "profile", None), host=args.worker_host,
                          port=args.worker_port, allow_remote=args.allow_remote)
        if args.json:
            import json

            print(json.dumps(r.to_dict(), indent=2))
            return 0
        print(f"deployed an RPC worker card for {r.profile} to {r.to}")
        for c in r.checks:
            print(f"checked: {c}")
        print("on the Pi: cp rpc-worker.env /etc/hublab/ && systemctl enable --now hublab-rpc-worker")
        return 0
    r = deploy(args.to, args.packages, profile=getattr(args, "profile", None), registry=args.registry,
               allow_unsigned=args.allow_unsigned, image=args.image, progress=None if args.json else ProgressBar())
    if args.json:
        import json

        print(json.dumps(r.to_dict(), indent=2))
        return 0
    print(f"deployed {len(r.packages)} packages for {r.profile} to {r.to}: {r.files} files, {format_size(r.size)}")
    for p in r.packages:
        print(f"  {p['name']} {p['version']}" + (f" [{p['variant']}]" if p["variant"] else "") + f"  {p['root']}")
    for c in r.checks:
        print(f"checked: {c}")
    print(f"on the Pi: export HUBLAB_CONFIG={r.system_toml}")
    return 0
