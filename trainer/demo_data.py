"""Datasets for the demo experts: question -> answer pairs in the voice users want, built offline.

Each domain's pairs come from two sources on this machine:
- trainer/data/answers/<domain>.jsonl: direct 1-4 sentence answers written by the team (the bulk);
- short answers drawn from this machine's documentation: the first sentence of a Python stdlib docstring
  (python), of a Rust std item's docs (rust), of torch.nn/optim docstrings (ai), a man page's NAME line
  (system), turned into an answer ("`ls` lists directory contents.") and kept only when they read as one.
Every expert but general mixes in general pairs (GENERAL_SHARE of its set) so it keeps answering plainly
instead of imitating documents. Per domain it writes:
  <domain>.jsonl       training pairs (domain + general mix)
  <domain>_dev.jsonl   DEV_SIZE team-written pairs held out from training and packs: for choosing
                       checkpoints and decoding settings (bench/quality.py --set), never the held-out set
  <domain>_pack.jsonl  the knowledge pack: the domain's own pairs, retrieved into the prompt on the device
The benchmark's question sets (bench/quality/, bench/routing/) are never read here; tests/test_heldout.py checks
that no training or knowledge file comes near a held-out question or reference.
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
ANSWERS = HAND_WRITTEN / "answers"
MAX_ANSWER = 700  # characters; keeps examples inside a 128-192 token window
DOC_SHARE = 0.3        # documentation pairs, at most this share of a domain's own pairs
GENERAL_SHARE = 0.2    # general pairs mixed into every other expert's training set
DEV_SIZE = 30


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


# ---------------------------------------------------------------------------------------------------
# The answer set: team-written pairs plus documentation turned into short answers.

_ARTICLES = ("a ", "an ", "the ")
# Verbs documentation sentences start with ("Return the ...", "list directory contents"); a sentence that
# starts with any other word is a noun phrase ("Context manager for ...") and is dropped, not conjugated.
_VERBS = frozenset("""add adjust allocate append apply ask assign attach build calculate call change check clear close
collect combine communicate compare compile compress compute configure connect construct control convert copy count
create decode decompress define delete describe detect determine display download drop dump edit emit encode ensure
evaluate execute expand export extract fetch fill filter find flush format generate get handle hash import inform
initialize insert install invoke iterate join keep kill list load lock look make manage map mark merge modify monitor
mount move normalize open output pack parse perform play print process produce provide query raise read receive record
reduce register reload remove rename render repeat replace report represent reset resize resolve restore retrieve
return reverse rotate run save scan schedule search select send serialize set show shut sign sort split start stop
store strip submit swap synchronize take test trace track transform translate trigger truncate try turn unlock unmount
unpack update upgrade upload validate verify view wait wrap write yield""".split())


def _third_person(verb: str) -> str:
    """'return' -> 'returns', 'list' -> 'lists', 'copy' -> 'copies', 'search' -> 'searches'."""
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and len(verb) > 1 and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _first_sentence(text: str, limit: int = 220) -> str | None:
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r":(?:math|class|func|attr|meth|data):`~?([^`]+)`", r"`\1`", text)
    para = re.split(r"\n\s*\n", text.strip())[0]
    para = re.sub(r"\s+", " ", para)
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    sentence = (m.group(1) if m else para).strip()
    if not (20 <= len(sentence) <= limit) or any(bad in sentence for bad in (">>>", "::", "deprecated", "Deprecated")):
        return None
    return sentence


def _as_answer(subject: str, sentence: str) -> str | None:
    """'`subject` <sentence as a third-person clause>.': 'Return the sum.' -> '`sum` returns the sum.'"""
    word, _, rest = sentence.partition(" ")
    low = sentence[0].lower() + sentence[1:]
    if low.startswith(_ARTICLES):
        return f"{subject} is {low}"
    verb = word.lower()
    if not rest or not word.isalpha():
        return None
    if verb in _VERBS:
        return f"{subject} {_third_person(verb)} {rest}"
    if any(stem in _VERBS for stem in (verb[:-1], verb[:-2], verb[:-3] + "y")) and verb.endswith("s"):
        return f"{subject} {verb} {rest}"  # already third person ("Returns the ...")
    return None


def python_doc_pairs() -> list[dict]:
    out = []
    for rec in python_records():
        m = re.match(r"What does the Python (function|class) (\S+) do\?", rec["question"])
        if not m:
            continue
        doc = rec["response"].split("\n\n", 1)[-1]
        sentence = _first_sentence(doc)
        name = m.group(2)
        answer = sentence and _as_answer(f"`{name}" + ("()`" if m.group(1) == "function" else "`"), sentence)
        if answer:
            module = name.rpartition(".")[0]
            where = f" It is in the `{module}` module." if module else " It is a built-in."
            out.append({"question": f"What does {name} do in Python?", "response": answer + where})
    return out


def rust_doc_pairs() -> list[dict]:
    out = []
    for rec in rust_records():
        m = re.match(r"What is the Rust (\S+(?: type)?) (\S+)\?", rec["question"])
        sentence = _first_sentence(rec["response"])
        if not m or not sentence or "intrinsics" in m.group(2):  # compiler internals, not what users ask
            continue
        name = m.group(2)
        answer = _as_answer(f"`{name}`", sentence)
        if answer:
            out.append({"question": f"What is {name} in Rust?", "response": answer})
    return out


def system_doc_pairs(limit: int = 4000) -> list[dict]:
    out = []
    for section in ("1", "8"):
        for page in sorted(Path("/usr/share/man", f"man{section}").glob("*.gz"))[:limit]:
            command = page.name.split(".")[0]
            if "_" in command or not re.fullmatch(r"[a-z][a-z0-9+-]{1,20}", command):
                continue
            try:
                src = gzip.decompress(page.read_bytes()).decode("utf-8", "replace")
            except (OSError, EOFError):
                continue
            m = re.search(r'^\.S[Hh]\s+"?NAME"?\s*\n(?:\.\w+\s*\n)*(.+?)\n', src, re.M)
            if not m:
                continue
            line = re.sub(r"\\f[BIRP]|\\\(em|\\&", "", m.group(1)).replace("\\-", "-")
            names, sep, desc = line.partition(" - ")
            desc = desc.strip().rstrip(".")
            if not sep or not (8 <= len(desc) <= 120) or command not in names:
                continue
            answer = _as_answer(f"`{command}`", desc[0].upper() + desc[1:] + ".")
            if answer:
                out.append({"question": f"What does the {command} command do?",
                            "response": f"{answer} Run `man {command}` for its options."})
    return out


def ai_doc_pairs() -> list[dict]:
    out = []
    try:
        import torch
    except ImportError:
        return out
    for mod in (torch.nn, torch.optim):
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or not inspect.isclass(obj):
                continue
            sentence = _first_sentence(inspect.getdoc(obj) or "")
            name = f"{mod.__name__}.{attr}"
            answer = sentence and _as_answer(f"`{name}`", sentence)
            if answer:
                out.append({"question": f"What is {name} in PyTorch?", "response": answer})
    return out


DOC_PAIRS = {"python": python_doc_pairs, "rust": rust_doc_pairs, "system": system_doc_pairs, "ai": ai_doc_pairs,
             "general": lambda: []}


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = " ".join(re.findall(r"[a-z0-9]+", r["question"].lower()))
        if key and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def build_answers(out_dir: Path, domains=DOMAINS, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write <domain>.jsonl, <domain>_dev.jsonl and <domain>_pack.jsonl; returns the counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    team = {d: _dedupe(_read(ANSWERS / f"{d}.jsonl") + _read(HAND_WRITTEN / f"demo_{d}.jsonl")) for d in DOMAINS}
    dev, own = {}, {}
    for d in DOMAINS:
        rows = list(team[d])
        rng.shuffle(rows)
        dev[d], own[d] = rows[:DEV_SIZE], rows[DEV_SIZE:]
    counts = {}
    for d in domains:
        docs = _dedupe(DOC_PAIRS[d]())
        rng.shuffle(docs)
        docs = docs[: int(len(own[d]) * DOC_SHARE / (1 - DOC_SHARE))]
        mine = _dedupe(own[d] + docs)
        share = int(len(mine) * GENERAL_SHARE / (1 - GENERAL_SHARE))
        general = [] if d == "general" else rng.sample(own["general"], min(len(own["general"]), share))
        train = mine + general
        rng.shuffle(train)
        for name, rows in ((f"{d}.jsonl", train), (f"{d}_dev.jsonl", dev[d]), (f"{d}_pack.jsonl", mine)):
            (out_dir / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                        encoding="utf-8")
        counts[d] = {"team": len(own[d]), "docs": len(docs), "general_mix": len(general), "train": len(train),
                     "dev": len(dev[d]), "pack": len(mine)}
    return counts


def with_shots(rows: list[dict], pack: Path, router_dir: Path, k: int = 2, least: float = 0.45,
               near: float = 0.95) -> list[dict]:
    """Training pairs as the device asks them: each question after the `k` pack pairs closest to it, as earlier
    chat turns (runtime/routing/knowledge.py's `shots`, found with the router's encoder, at similarity `least` or
    more), so an expert learns to answer from what it is shown. A pair of the question itself, or one at
    similarity `near` or more, is left out: on the device a new question has no pair of its own, and an expert
    that learned to copy its twin would copy a neighbour's answer to a different question."""
    from hublab.runtime.routing.knowledge import Library, shots
    from hublab.runtime.routing.router import Router

    router = Router.load(router_dir, [], threads=1)
    library = Library(router.embed, router.encoder_id)
    found = library.pack(pack)
    queries = router.embed([r["question"] for r in rows])
    out = []
    for row, query in zip(rows, queries):
        same = row["question"].strip().lower()
        pairs = [(score, rec) for score, rec in found.nearest(query, k + 4, least)
                 if score < near and rec["question"].strip().lower() != same][:k]
        out.append({"messages": shots(pairs) + [{"role": "user", "content": row["question"]},
                                                {"role": "assistant", "content": row["response"]}]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="build/demo-data")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    args = parser.parse_args(argv)
    for domain, counts in build_answers(Path(args.out_dir), args.domains.split(",")).items():
        print(domain, json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
