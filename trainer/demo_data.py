"""Datasets for the demo experts, built offline from this machine's own documentation.

python: stdlib docstrings (inspect)        rust:   rustdoc HTML of the installed toolchain (std docs)
system: man pages (man -l, sections 1/5/8)  ai:     torch.nn/optim docstrings + hand-written Q/A
general: hand-written Q/A about hublab and everyday topics + Debian package descriptions

Each domain gets `<domain>.jsonl` ({"question","response"}) for training and `<domain>_test.jsonl`, a
held-out slice never trained on, for the perplexity table. Deterministic for a given machine.
"""
from __future__ import annotations

import argparse
import gzip
import html
import importlib
import inspect
import json
import random
import re
import subprocess
from pathlib import Path

DOMAINS = ("python", "rust", "system", "ai", "general")
HAND_WRITTEN = Path(__file__).parent / "data"
MAX_ANSWER = 700  # characters; keeps examples inside a 128-192 token window


def _clip(text: str, limit: int = MAX_ANSWER) -> str:
    text = re.sub(r"[ \t]+", " ", text.strip())
    text = re.sub(r"\n{3,}", "\n\n", text)
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > limit // 3 else cut.rstrip() + " ..."


def python_records() -> list[dict]:
    modules = ["builtins", "os", "os.path", "json", "re", "itertools", "functools", "collections", "pathlib",
               "subprocess", "string", "math", "random", "datetime", "typing", "dataclasses", "argparse",
               "shutil", "glob", "csv", "io", "time", "logging", "statistics", "textwrap", "heapq", "bisect",
               "copy", "enum", "contextlib", "hashlib", "base64", "struct", "socket", "threading", "queue",
               "asyncio", "sqlite3", "tempfile", "zipfile", "gzip", "pickle", "unittest", "urllib.parse",
               "operator", "fractions", "decimal", "uuid", "secrets", "difflib", "pprint", "inspect", "abc"]
    out = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(mod)
        if doc:
            out.append({"question": f"What is the Python module {name} for?", "response": _clip(doc)})
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", name) not in (name, mod.__name__, None) and name != "builtins":
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 40:
                continue
            try:
                sig = f"{attr}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                sig = attr
            full = attr if name == "builtins" else f"{name}.{attr}"
            kind = "class" if inspect.isclass(obj) else "function"
            out.append({"question": f"What does the Python {kind} {full} do?",
                        "response": _clip(f"`{sig}`\n\n{doc}")})
    return out


def rust_records() -> list[dict]:
    roots = sorted(Path.home().glob(".rustup/toolchains/*/share/doc/rust/html/std"))
    if not roots:
        return []
    out = []
    for page in sorted(roots[0].rglob("*.html")):
        m = re.match(r"(struct|enum|trait|fn|macro|primitive)\.(\w+)\.html$", page.name)
        if not m or "/arch/" in str(page) or "/os/" in str(page):
            continue
        text = page.read_text(encoding="utf-8", errors="replace")
        block = re.search(r'<div class="docblock">(.*?)</div>', text, re.S)
        if not block:
            continue
        body = html.unescape(re.sub(r"<[^>]+>", "", block.group(1))).replace("§", "")
        if len(body) < 60:
            continue
        path = "std::" + "::".join(page.relative_to(roots[0]).parent.parts + (m.group(2),))
        path = path.replace("std::::", "std::")
        kind = {"fn": "function", "primitive": "primitive type"}.get(m.group(1), m.group(1))
        out.append({"question": f"What is the Rust {kind} {path}?", "response": _clip(body)})
    return out


def system_records(limit: int = 900) -> list[dict]:
    out = []
    pages = []
    for section in ("1", "8", "5"):
        pages += sorted(Path("/usr/share/man", f"man{section}").glob("*.gz"))
    for page in pages[:limit]:
        try:
            raw = gzip.decompress(page.read_bytes())
            text = subprocess.run(["man", "-l", "-"], input=raw, capture_output=True, timeout=10,
                                  env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}).stdout
        except (OSError, subprocess.SubprocessError, EOFError):
            continue
        text = re.sub(r".\x08", "", text.decode("utf-8", "replace"))
        name = re.search(r"\nNAME\n\s+(.+?)\n\n", text, re.S)
        desc = re.search(r"\nDESCRIPTION\n(.+?)(?:\n[A-Z][A-Z ]+\n|$)", text, re.S)
        if not name or not desc:
            continue
        title = re.sub(r"\s+", " ", name.group(1)).strip()
        command = title.split(" - ")[0].split(",")[0].strip()
        body = re.sub(r"\n\s+", "\n", desc.group(1)).strip()
        what = "configuration file" if page.parent.name == "man5" else "command"
        out.append({"question": f"What does the Linux {what} {command} do?", "response": _clip(f"{title}.\n\n{body}")})
    return out


def ai_records() -> list[dict]:
    out = []
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        for mod, names in ((torch.nn, None), (torch.optim, None), (torch.nn.functional, None)):
            for attr in sorted(dir(mod)):
                obj = getattr(mod, attr)
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                    continue
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < 80:
                    continue
                doc = re.sub(r"\.\. \w+::.*", "", doc)
                doc = re.sub(r":(?:math|class|func|attr|meth):`~?([^`]+)`", r"\1", doc)
                out.append({"question": f"What is {mod.__name__}.{attr} in PyTorch?", "response": _clip(doc)})
    return out + _hand_written("ai")


def general_records() -> list[dict]:
    out = _hand_written("general")
    status = Path("/var/lib/dpkg/status")
    if status.exists():
        for block in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            pkg = re.search(r"^Package: (.+)$", block, re.M)
            desc = re.search(r"^Description: (.+(?:\n .+)*)", block, re.M)
            if pkg and desc and len(desc.group(1)) > 120:
                lines = desc.group(1).split("\n")
                body = lines[0].strip() + ".\n\n" + " ".join(line.strip().replace(" .", "\n") for line in lines[1:])
                out.append({"question": f"What is {pkg.group(1)}?", "response": _clip(body)})
    return out


def _hand_written(domain: str) -> list[dict]:
    path = HAND_WRITTEN / f"demo_{domain}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


BUILDERS = {"python": python_records, "rust": rust_records, "system": system_records, "ai": ai_records,
            "general": general_records}


def build(out_dir: Path, domains=DOMAINS, max_train: int = 800, test_fraction: float = 0.1,
          seed: int = 0) -> dict[str, tuple[int, int]]:
    """Write <domain>.jsonl and <domain>_test.jsonl under out_dir; returns {domain: (train, test)} counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for domain in domains:
        recs = BUILDERS[domain]()
        seen, unique = set(), []
        for r in recs:
            if r["question"] not in seen:
                seen.add(r["question"])
                unique.append(r)
        random.Random(seed).shuffle(unique)
        n_test = max(10, int(len(unique) * test_fraction)) if unique else 0
        test, train = unique[:n_test], unique[n_test:][:max_train]
        if not train:
            raise SystemExit(f"no {domain} documentation found on this machine; cannot build its dataset")
        for name, rows in ((f"{domain}.jsonl", train), (f"{domain}_test.jsonl", test)):
            (out_dir / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                        encoding="utf-8")
        counts[domain] = (len(train), len(test))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="build/demo-data")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--max-train", type=int, default=800)
    args = parser.parse_args(argv)
    for domain, (n_train, n_test) in build(Path(args.out_dir), args.domains.split(","), args.max_train).items():
        print(f"{domain}: {n_train} train, {n_test} held-out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
