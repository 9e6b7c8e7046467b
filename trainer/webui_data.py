"""Datasets of the training WebUI: checked uploads, statistics, previews, mixes and generated sets.

Every function takes the workspace and workspace-relative names; `inside(ws, rel)` is the one gate
that keeps every path in the workspace. An upload is checked in full (every record, every field)
before anything is written; a bad one is refused with the row and field of each problem.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

from hublab.runtime.errors import HublabError

from . import data as D

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DATA_SUFFIXES = (".jsonl", ".json", ".txt")
MAX_ERRORS = 20


class WebError(HublabError, ValueError):
    """A request the WebUI refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def inside(ws: Path, rel: str | Path) -> Path:
    """`rel` resolved under the workspace; refuses absolute paths, '..' and links that lead out."""
    rel = str(rel)
    if not rel or rel.startswith(("/", "\\")) or "\x00" in rel or re.match(r"^[A-Za-z]:", rel):
        raise WebError(f"{rel!r}: give a path inside the workspace, relative to it", 403)
    root = Path(ws).resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise WebError(f"{rel!r}: leads outside the workspace; use a path inside it", 403)
    return path


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise WebError(f"{what} {name!r}: use letters, digits, '.', '_' or '-' (at most 64, not starting with '.')")
    return name


def datasets_dir(ws: Path) -> Path:
    return Path(ws) / "datasets"


def list_datasets(ws: Path) -> list[dict]:
    """Every data file (and every entry of every dataset_info.json) under WORKSPACE/datasets."""
    root = datasets_dir(ws)
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(Path(ws)).as_posix()
        if p.name == "dataset_info.json":
            try:
                info = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                continue
            for name, entry in sorted(info.items()):
                local = isinstance(entry, dict) and "file_name" in entry
                out.append({"path": rel, "name": name, "label": f"{rel}#{name}", "local": local,
                            "size": (p.parent / entry["file_name"]).stat().st_size
                            if local and (p.parent / entry["file_name"]).is_file() else 0})
        elif p.suffix in DATA_SUFFIXES:
            out.append({"path": rel, "name": "", "label": rel, "local": True, "size": p.stat().st_size})
    return out


def spec_of(ws: Path, path: str, name: str = "", fmt: str = "auto", ratio: float = 1.0) -> D.DataSpec:
    return D.DataSpec(inside(ws, path), ratio, fmt, name)


# ---------------------------------------------------------------------------------------------------
# Checking

def check_records(path: Path, fmt: str = "auto", shown: str | None = None) -> tuple[list[D.Example], list[str], str]:
    """(examples, problems, format) of one data file; every record is checked, problems name row and field."""
    shown = shown or path.name
    try:
        records = D.read_records(path)
    except D.DataError as exc:
        return [], [str(exc).replace(str(path), shown)], fmt
    if fmt == "auto":
        fmt = D.detect_format(records[0][1]) or ""
        if not fmt:
            keys = ", ".join(sorted(records[0][1])) or "none"
            return [], [f"{shown}:{records[0][0]}: cannot tell the format from columns ({keys}); expected "
                        "instruction/output, conversations/messages, question/response, prompt/response or text"], fmt
    examples, problems = [], []
    for line, rec in records:
        try:
            examples.append(D.to_example(rec, fmt, f"{shown}:{line}"))
        except D.DataError as exc:
            problems.append(f"row {line}: {str(exc).split(': ', 1)[-1]}")
    return examples, problems, fmt


def check_registry(directory: Path, info_text: str, shown: str) -> list[str]:
    """Problems of a dataset_info.json (about to be) placed in `directory`: its JSON, and every local
    entry whose data file is there already."""
    try:
        info = json.loads(info_text)
    except json.JSONDecodeError as exc:
        return [f"{shown}: line {exc.lineno}: invalid JSON ({exc.msg})"]
    if not isinstance(info, dict) or not info:
        return [f"{shown}: expected an object of named datasets"]
    problems = []
    with tempfile.TemporaryDirectory(dir=directory.parent if directory.exists() else None) as tmp:
        # check the entries against a copy, so a refused registry leaves nothing behind
        reg = Path(tmp) / "dataset_info.json"
        reg.write_text(info_text, encoding="utf-8")
        for name, entry in info.items():
            if not isinstance(entry, dict):
                problems.append(f"{shown}: entry {name!r} must be an object with file_name")
                continue
            fname = entry.get("file_name")
            if not fname:
                continue  # a hub entry: listed, not loadable here
            if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
                problems.append(f"{shown}: entry {name!r} file_name {fname!r}: give a file name in the same folder")
                continue
            data = directory / fname
            if not data.is_file():
                continue
            os.symlink(data, Path(tmp) / fname)
            try:
                D.load_registry(reg, name)
            except D.DataError as exc:
                problems.append(str(exc).replace(str(Path(tmp)), directory.name))
    return problems


def save_upload(ws: Path, filename: str, body: bytes, folder: str = "", fmt: str = "auto") -> dict:
    """Check an uploaded data file (or dataset_info.json) in full, then write it to WORKSPACE/datasets.

    Nothing is written when any record is bad; the WebError lists the rows and fields to fix.
    """
    check_name(filename, "file name")
    if folder:
        check_name(folder, "folder")
    if filename != "dataset_info.json" and not filename.endswith(DATA_SUFFIXES):
        raise WebError(f"{filename}: upload .jsonl, .json or .txt data, or a dataset_info.json")
    if fmt not in D.FORMATS:
        raise WebError(f"format {fmt!r}: use one of {', '.join(D.FORMATS)}")
    target_dir = inside(ws, f"datasets/{folder}" if folder else "datasets")
    target = target_dir / filename
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebError(f"{filename}: byte {exc.start} is not UTF-8; save the file as UTF-8") from None
    if filename == "dataset_info.json":
        problems = check_registry(target_dir, text, filename)
        count, detected = None, "registry"
    else:
        # the whole file, checked from a temporary copy outside the datasets folder
        tmp_dir = inside(ws, ".tmp")
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=Path(filename).suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            examples, problems, detected = check_records(Path(tmp), fmt, filename)
            count = len(examples)
        finally:
            Path(tmp).unlink(missing_ok=True)
    if problems:
        more = f" (and {len(problems) - MAX_ERRORS} more)" if len(problems) > MAX_ERRORS else ""
        raise WebError(f"{filename}: not saved; fix " + "; ".join(problems[:MAX_ERRORS]) + more, 422)
    target_dir.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    part.write_bytes(body)
    part.replace(target)
    return {"path": target.relative_to(Path(ws).resolve()).as_posix(), "records": count, "format": detected}


# ---------------------------------------------------------------------------------------------------
# Looking at a dataset

def _key(ex: D.Example) -> str:
    body = ex.text if ex.text is not None else json.dumps(ex.messages, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(" ".join(body.lower().split()).encode()).hexdigest()


def _plain(tpl: str, messages: list[dict]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment().from_string(tpl).render(
        messages=messages, add_generation_prompt=False, bos_token="<bos>", eos_token="<eos>")


def inspect(ws: Path, path: str, name: str = "", fmt: str = "auto", base: str = "", template: str = "chatml",
            rows: int = 5, bins: int = 12) -> dict:
    """Counts, token-length histogram, duplicates, problems (row numbers) and the first rows rendered
    with the chat template training will use (the base's tokenizer when `base` is given)."""
    spec = spec_of(ws, path, name, fmt)
    shown = path + (f"#{name}" if name else "")
    if name or spec.path.name == "dataset_info.json":
        try:
            examples, problems = D.load_examples(spec), []
        except D.DataError as exc:
            examples, problems = [], [str(exc).replace(str(Path(ws).resolve()) + "/", "")]
        detected = "registry"
    else:
        if not spec.path.is_file():
            raise WebError(f"{path}: no such dataset in the workspace", 404)
        examples, problems, detected = check_records(spec.path, fmt, path)
    tok = None
    template = template or "auto"
    gguf = None
    if base:
        from .lora import resolve_base

        directory, gguf_name = resolve_base(base)
        gguf = directory / gguf_name if gguf_name else None
    if gguf is not None:  # the GGUF's header says what training will use; dequantising it is a minute's work
        tpl, used = gguf_template(gguf, template)
        unit = "words"
    elif base:
        from .lora import base_tokenizer

        tok, model_dir = base_tokenizer(base)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        tpl = D.resolve_template(tok, template, cfg.get("model_type", ""))
        used = template if template != "auto" else next(
            (n for n, t in D.TEMPLATES.items() if t == tpl), "the tokenizer's own")
        unit = "tokens"
    else:
        used = template if template in D.TEMPLATES else "chatml"  # no base: auto cannot be told
        tpl = D.TEMPLATES[used]
        unit = "words"
    lengths, preview = [], []
    for i, ex in enumerate(examples):
        msgs = D.conversation(ex)
        if ex.text is not None:
            rendered = ex.text
        elif tok is not None:
            rendered = D._render(tok, tpl, msgs, add_generation_prompt=False)
        else:
            rendered = _plain(tpl, msgs)
        if i < rows:
            preview.append({"source": ex.source.replace(str(Path(ws).resolve()) + "/", ""), "rendered": rendered,
                            "tools": ex.tools})
        if tok is not None:
            lengths.append(len(tok(rendered, add_special_tokens=False)["input_ids"]))
        else:
            lengths.append(len(rendered.split()))
    seen: dict[str, str] = {}
    duplicates = []
    for ex in examples:
        k = _key(ex)
        if k in seen:
            duplicates.append({"row": ex.source.rsplit(":", 1)[-1], "same_as": seen[k].rsplit(":", 1)[-1]})
        else:
            seen[k] = ex.source
    hist = []
    if lengths:
        lo, hi = min(lengths), max(lengths)
        width = max(1, -(-(hi - lo + 1) // bins))
        counts = Counter((n - lo) // width for n in lengths)
        hist = [{"from": lo + b * width, "to": lo + (b + 1) * width - 1, "count": counts.get(b, 0)}
                for b in range((hi - lo) // width + 1)]
    kinds = Counter("text" if ex.text is not None else ("tools" if ex.tools else "chat") for ex in examples)
    return {"dataset": shown, "format": detected, "records": len(examples), "kinds": dict(kinds),
            "turns": sum(len(ex.messages) for ex in examples), "unit": unit,
            "length": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)}
            if lengths else None, "histogram": hist, "duplicates": duplicates[:200],
            "duplicate_count": len(duplicates), "problems": problems[:200], "preview": preview, "template": used}


def gguf_template(path: Path, template: str) -> tuple[str, str]:
    """(Jinja template, its name) that training on a GGUF base renders with: a named one, else (auto) the
    GGUF's own template, else the built-in format for its architecture and special tokens."""
    from hublab.runtime import chat
    from hublab.runtime.engine.memory import read_gguf

    if template != "auto":
        if template not in D.TEMPLATES:
            raise WebError(f"template {template!r}: use auto or one of {', '.join(D.TEMPLATES)}")
        return D.TEMPLATES[template], template
    info = read_gguf(path)
    if info.chat_template:
        return info.chat_template, "the GGUF's own"
    tokens: set[str] = set()
    if not info.arch.startswith("gemma"):  # the vocabulary decides between llama3, chatml and plain
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("tokenizer.ggml.tokens")
        tokens = {t for t in (field.contents() if field else []) if t.startswith("<|")}
    name = chat.auto_format(info.arch, tokens.__contains__)
    return D.TEMPLATES[name], name


def mix_datasets(ws: Path, out_name: str, parts: list[dict], total: int = 0, seed: int = 0) -> dict:
    """Write a mixed dataset (sharegpt-style JSONL) drawing each part by its ratio."""
    check_name(out_name, "dataset name")
    out = inside(ws, f"datasets/{out_name}" + ("" if out_name.endswith(".jsonl") else ".jsonl"))
    if not parts:
        raise WebError("give at least one dataset to mix")
    sets, ratios = [], []
    for p in parts:
        ratio = float(p.get("ratio", 1.0))
        if ratio <= 0:
            raise WebError(f"{p.get('path')}: ratio must be > 0")
        try:
            sets.append(D.load_examples(spec_of(ws, p["path"], p.get("name", ""), p.get("format", "auto"))))
        except D.DataError as exc:
            raise WebError(str(exc).replace(str(Path(ws).resolve()) + "/", ""), 422) from None
        ratios.append(ratio)
    mixed = D.mix(sets, ratios, seed, total or None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in D.as_dicts(mixed)), encoding="utf-8")
    return {"path": out.relative_to(Path(ws).resolve()).as_posix(), "records": len(mixed)}


def generate(ws: Path, domain: str, out_name: str = "", limit: int = 0) -> dict:
    """Question/answer pairs drawn from this machine's documentation (trainer.demo_data's doc pairs)."""
    from . import demo_data

    if domain not in demo_data.DOC_PAIRS:
        raise WebError(f"domain {domain!r}: use one of {', '.join(demo_data.DOC_PAIRS)}")
    rows = demo_data._dedupe(demo_data.DOC_PAIRS[domain]())
    if limit:
        rows = rows[:limit]
    if not rows:
        raise WebError(f"domain {domain!r}: this machine's documentation gave no pairs", 422)
    name = check_name(out_name or f"docs-{domain}.jsonl", "dataset name")
    out = inside(ws, f"datasets/{name}" + ("" if name.endswith(".jsonl") else ".jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"path": out.relative_to(Path(ws).resolve()).as_posix(), "records": len(rows), "domain": domain}
