"""`hublab pkg` on the command line: its arguments, and the text each verb's data reads as.

The verbs (author.py, install.py, catalog.py) return data. `call` runs the one the parsed arguments
name and gives back an `Output`: that data ready for JSON, the text a person reads, and whether it went
well. `cli` prints it; the hublab> shell calls `call` and prints the Output itself.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..config import format_size
from .registry import Progress
from .author import build, keygen, publish
from .catalog import search, show
from .context import PackageError
from .install import install, list_packages, remove, update, verify


@dataclass
class Output:
    """What a pkg command gives back."""
    data: Any          # plain lists and dicts: what --json prints
    text: str          # what a person reads
    ok: bool = True    # False: exit status 1 (an update failed, verify found a problem)


class ProgressBar:
    """size, percentage and rate on stderr; a tty gets a live bar, a log gets one line per file."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = None
        self.last = 0.0

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if label != self.label:
            self.label, self.t0, self.start, self.last = label, now, done, 0.0
        finished = done >= total
        if not finished and (not self.tty or now - self.last < 0.1):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-3)
        pct = 100.0 * done / total if total else 100.0
        bar = "#" * int(pct / 5)
        line = (f"{label[:38]:<38} [{bar:<20}] {pct:5.1f}%  {format_size(done)} / {format_size(total)}  "
                f"{format_size(rate)}/s")
        self.stream.write(("\r" if self.tty else "") + line + ("\n" if finished else ""))
        self.stream.flush()
        if finished:
            self.label = None


def _common(p, registry: bool = False, models: bool = False, profile: bool = False) -> None:
    import argparse

    if registry:
        p.add_argument("--registry", help="registry: a directory or http(s)://host[:port][/namespace] "
                                          "(default: system.toml [registry] url, else ~/.local/share/hublab/registry)")
    if models:
        p.add_argument("--models-dir", help="models directory to work on (default: system.toml [runtime] models_dir)")
    if profile:
        p.add_argument("--profile", default=argparse.SUPPRESS, help="board profile to fit (e.g. pi4-4gb)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="pkg_command", metavar="COMMAND", required=True)
    p = sub.add_parser("keygen", help="make an ed25519 signing key")
    p.add_argument("--out", help="key file (default: ~/.config/hublab/signing.key)")
    p.add_argument("--trust", action="store_true", help="also add the public key to system.toml [trust] keys")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    _common(p)
    p = sub.add_parser("build", help="fill in DIR/package.toml (files, sizes, sha256) and sign it")
    p.add_argument("directory")
    p.add_argument("--key", help="signing key file (default: ~/.config/hublab/signing.key if it exists)")
    p.add_argument("--unsigned", action="store_true", help="do not sign")
    _common(p)
    p = sub.add_parser("publish", help="publish a built DIR, or copy NAME[:TAG] from --from, to a registry")
    p.add_argument("source", help="package directory or NAME[:TAG]")
    p.add_argument("--tag", help="tag to publish under (default: the version, and latest)")
    p.add_argument("--from", dest="from_registry", help="registry to copy NAME[:TAG] from (default registry)")
    _common(p, registry=True)
    p = sub.add_parser("install", help="install NAME[:TAG] (the variant that fits the board)")
    p.add_argument("refs", nargs="+", metavar="NAME[:TAG]")
    p.add_argument("--variant", help="install this variant (name or quant) instead of the best fit")
    p.add_argument("--allow-unsigned", action="store_true", help="accept unsigned or untrusted packages")
    _common(p, registry=True, models=True, profile=True)
    p = sub.add_parser("remove", help="uninstall packages")
    p.add_argument("names", nargs="+", metavar="NAME")
    _common(p, models=True)
    p = sub.add_parser("list", help="installed packages")
    _common(p, models=True)
    p = sub.add_parser("search", help="packages in a registry matching TERM")
    p.add_argument("term", nargs="?", default="")
    _common(p, registry=True)
    p = sub.add_parser("show", help="details of a package and how its variants fit the board")
    p.add_argument("ref", metavar="NAME[:TAG]")
    _common(p, registry=True, models=True, profile=True)
    p = sub.add_parser("update", help="install newer versions of installed packages")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--allow-unsigned", action="store_true", help="accept unsigned or untrusted packages")
    _common(p, registry=True, models=True, profile=True)
    p = sub.add_parser("verify", help="re-hash installed files; finish interrupted installs")
    p.add_argument("names", nargs="*", metavar="NAME")
    _common(p, models=True)



def _keygen(args, progress: Progress | None) -> Output:
    r = keygen(args.out, trust=args.trust, force=args.force)
    text = f"key file    {r['key_file']}  (keep it private)\npublic key  {r['public_key']}\n"
    text += (f"trusted in  {r['trusted_in']}" if r["trusted_in"] else
             "add the public key to a device's system.toml [trust] keys to accept packages signed with it")
    return Output(r, text)


def _build(args, progress: Progress | None) -> Output:
    r = build(args.directory, key=args.key, sign=not args.unsigned)
    lines = [f"built {r.name} {r.version} ({r.category}): {r.files} files, {format_size(r.size)}"
             + (f", variants {', '.join(r.variants)}" if r.variants else ""),
             f"digest {r.digest}",
             f"signed by {r.signed_by}" if r.signed_by else "not signed (make a key with hublab pkg keygen)"]
    return Output(r.to_dict(), "\n".join(lines))


def _publish(args, progress: Progress | None) -> Output:
    r = publish(args.source, args.registry, tag=args.tag, from_registry=args.from_registry, progress=progress)
    return Output(r.to_dict(), f"published {r.name} {r.version} as {', '.join(r.tags)} to {r.registry} "
                               f"({r.uploaded_blobs} blobs uploaded, {r.skipped_blobs} already there)"
                               + ("" if r.signed_by else "; unsigned"))


def _install(args, progress: Progress | None) -> Output:
    results = [install(ref, args.registry, models_dir=args.models_dir, profile=getattr(args, "profile", None),
                       variant=args.variant, allow_unsigned=args.allow_unsigned, progress=progress)
               for ref in args.refs]
    lines = []
    for r in results:
        what = f"{r.name} {r.version}" + (f" [{r.variant}]" if r.variant else "")
        if r.status == "unchanged":
            lines.append(f"{what} is already installed and intact")
        else:
            prev = f" (was {r.previous})" if r.previous else ""
            lines.append(f"{r.status} {what}{prev} for {r.profile} in {r.root}: {r.files} files, "
                         f"{format_size(r.size)}, {format_size(r.downloaded)} downloaded in {r.seconds:.1f} s"
                         + ("" if r.signed_by else "; NOT signed by a trusted key"))
    return Output([r.to_dict() for r in results], "\n".join(lines))


def _remove(args, progress: Progress | None) -> Output:
    results = [remove(n, models_dir=args.models_dir) for n in args.names]
    return Output(results, "\n".join(f"removed {r['name']} {r['version']} ({format_size(r['freed'])})"
                                      for r in results))


def _list(args, progress: Progress | None) -> Output:
    recs = list_packages(models_dir=args.models_dir)
    lines = [f"{r.name:<24} {r.version:<10} {r.category:<7} {format_size(r.size):>10}"
             f"{f' [{r.variant}]' if r.variant else ''}  {r.description}" for r in recs]
    return Output([r.to_dict() for r in recs], "\n".join(lines) or "no packages installed")


def _search(args, progress: Progress | None) -> Output:
    found = search(args.term, args.registry)
    lines = [f"{p['name']:<24} {p['version']:<10} {p['category']:<7} {format_size(p['size']):>10}  "
             f"{p['description']}" for p in found]
    return Output(found, "\n".join(lines) or "no packages match")


def _show(args, progress: Progress | None) -> Output:
    info = show(args.ref, args.registry, models_dir=args.models_dir, profile=getattr(args, "profile", None))
    lines = []
    if "package" in info:
        p = info["package"]
        lines += [f"{p['name']} {p['version']} ({p['category']})  {p['description']}",
                  f"registry  {info['registry']}  tags: {', '.join(p['tags'])}",
                  f"signed by {info['signed_by'] or '(unsigned)'}"]
        if p["experts"]:
            lines.append(f"experts   {', '.join(p['experts'])}")
        lines.append(f"variants on {info['profile']}:")
        for i, v in enumerate(info["variants"]):
            mark = "*" if i == 0 and v["fits"] else ("-" if not v["fits"] else " ")
            lines.append(f"  {mark} {v['variant'] or '(single)':<12} {v['quant']:<8} {format_size(v['size']):>10}  "
                         f"{v['reason']}")
    rec = info.get("installed")
    if rec:
        lines.append(f"installed {rec['version']}" + (f" [{rec['variant']}]" if rec["variant"] else "")
                     + f" in {rec['root']} from {rec['registry']}")
    if info.get("registry_error"):
        lines.append(f"registry: {info['registry_error']}")
    return Output(info, "\n".join(lines))


def _update(args, progress: Progress | None) -> Output:
    results = update(args.names or None, args.registry, models_dir=args.models_dir,
                     profile=getattr(args, "profile", None), allow_unsigned=args.allow_unsigned, progress=progress)
    lines = []
    for r in results:
        if r.status == "updated":
            lines.append(f"{r.name}: {r.old_version} -> {r.new_version} {r.detail}".rstrip())
        elif r.status == "up-to-date":
            lines.append(f"{r.name}: {r.old_version} is up to date")
        else:
            lines.append(f"{r.name}: update failed: {r.detail}")
    return Output([r.to_dict() for r in results], "\n".join(lines) or "no packages installed",
                  ok=all(r.status != "failed" for r in results))


def _verify(args, progress: Progress | None) -> Output:
    v = verify(args.names or None, models_dir=args.models_dir)
    lines = [f"recovered: {a}" for a in v.recovered]
    lines += [f"{r.name} {r.version}: " + ("ok" if r.ok else "; ".join(r.problems)) + f"  ({r.files} files)"
              for r in v.packages]
    lines += [f"store: {prob}" for prob in v.store_problems]
    if not v.packages and not v.store_problems:
        lines.append("no packages installed")
    return Output(v.to_dict(), "\n".join(lines), ok=v.ok)


VERBS: dict[str, Callable[[Any, Progress | None], Output]] = {
    "keygen": _keygen, "build": _build, "publish": _publish, "install": _install, "remove": _remove,
    "list": _list, "search": _search, "show": _show, "update": _update, "verify": _verify,
}


def call(args, progress: Progress | None = None) -> Output:
    """Run the verb `args.pkg_command` names (arguments as add_arguments parses them); prints nothing."""
    verb = VERBS.get(args.pkg_command)
    if verb is None:
        raise PackageError(f"unknown pkg command {args.pkg_command!r}")
    return verb(args, progress)


def cli(args) -> int:
    out = call(args, progress=None if args.json else ProgressBar())
    if args.json:
        print(json.dumps(out.data, indent=2, default=str))
    elif out.text:
        print(out.text)
    return 0 if out.ok else 1
