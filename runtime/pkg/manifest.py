"""Package manifests (`package.toml`): parse, validate against packaging/package.schema.json, write, hash.

A built package is a directory holding `package.toml` and the files it lists (each with role, size and
sha256), optionally `package.sig`. The manifest's digest (sha256 of its bytes) is what gets signed and,
through the per-file hashes, pins every file.

The schema is checked with a small validator for the JSON-Schema subset the schema uses, so the Pi
needs no `jsonschema` (and its compiled dependencies) for one file.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from ..config import toml_value, tomllib
from ..errors import HublabError
from ..paths import SCHEMA_PATH

MANIFEST_NAME = "package.toml"
SIGNATURE_NAME = "package.sig"
# Names at a package's root that the package manager writes itself; a package may not ship them.
RESERVED = {MANIFEST_NAME, SIGNATURE_NAME}
CATEGORIES = ("base", "expert", "router", "bundle")


class ManifestError(HublabError, ValueError):
    """package.toml is malformed or unsafe; the message names the file, the field and the fix."""


# ---------------------------------------------------------------------------------------------------
# Schema subset validator

_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool, "number": (int, float)}


def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def schema_errors(value: Any, schema: dict, where: str = "") -> list[str]:
    """Every way `value` breaks `schema` (draft 2020-12 subset), each as 'field.path: problem'."""
    here = where or "(top level)"
    t = schema.get("type")
    if t:
        py = _TYPES[t]
        if isinstance(value, bool) and t in ("integer", "number"):
            return [f"{here}: expected {t}, got {value!r}"]
        if not isinstance(value, py):
            return [f"{here}: expected {t}, got {type(value).__name__} {value!r}"[:200]]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{here}: {value!r} is not one of {', '.join(map(str, schema['enum']))}"]
    errors: list[str] = []
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{here}: must not be empty" if schema["minLength"] == 1 else f"{here}: too short")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{here}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{here}: {value!r} has a form that is not allowed")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema:
        if value < schema["minimum"]:
            errors.append(f"{here}: {value} is below {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where + '.' if where else ''}{key}: missing")
        for key, item in value.items():
            sub = f"{where}.{key}" if where else key
            if key in props:
                errors.extend(schema_errors(item, props[key], sub))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{sub}: unknown key (allowed: {', '.join(props)})")
    if isinstance(value, list):
        if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            errors.append(f"{here}: items repeat")
        for i, item in enumerate(value):
            errors.extend(schema_errors(item, schema.get("items", {}), f"{where}[{i}]"))
    return errors


# ---------------------------------------------------------------------------------------------------
# Paths

# What Linux file systems accept (NAME_MAX per component); a whole package path is capped well under
# PATH_MAX so that models_dir and the staging prefix still fit in front of it. JSON Schema's maxLength
# counts characters, not bytes, so these are checked here.
NAME_MAX = 255
PATH_MAX = 1024


def _show(path: str, limit: int = 60) -> str:
    """A path for an error message: repr'd, and shortened when it is long."""
    return repr(path if len(path) <= limit else path[:limit] + "…")


def safe_relpath(path: str, where: str = "path") -> str:
    """A package-relative POSIX path that cannot leave the package root and that file systems accept,
    or ManifestError."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{where}: empty path; give a relative path such as 'model.gguf'")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise ManifestError(f"{where}: {_show(path.encode('utf-8', 'backslashreplace').decode())} is not valid "
                            "Unicode (a lone surrogate); rename the file") from None
    if size > PATH_MAX:
        raise ManifestError(f"{where}: {_show(path)} is {size} bytes in UTF-8, over the {PATH_MAX}-byte limit for "
                            "a package path; shorten it")
    long_part = next((p for p in path.split("/") if len(p.encode("utf-8")) > NAME_MAX), None)
    if long_part is not None:
        raise ManifestError(f"{where}: name {_show(long_part)} is {len(long_part.encode('utf-8'))} bytes in UTF-8; "
                            f"file systems allow {NAME_MAX} per name: shorten it")
    bad = None
    if "\x00" in path or any(ord(c) < 32 for c in path):
        bad = "contains control characters"
    elif "\\" in path:
        bad = "contains a backslash; use '/'"
    elif path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        bad = "is absolute"
    else:
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts):
            bad = "has an empty, '.' or '..' component"
        elif any(p.startswith(".hublab") for p in parts):
            bad = "uses the reserved name .hublab"
    if bad:
        raise ManifestError(f"{where}: {_show(path)} {bad}; package paths must stay inside the package")
    return path


def join_inside(root: Path, rel: str) -> Path:
    """root/rel after checking rel is safe and that no existing component is a symlink leading out."""
    safe_relpath(rel)
    target = root.joinpath(*rel.split("/"))
    real_root = os.path.realpath(root)
    real = os.path.realpath(target)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ManifestError(f"{rel}: resolves outside {root} through a symlink; refusing to write there")
    return target


# ---------------------------------------------------------------------------------------------------
# The manifest

@dataclass
class FileEntry:
    path: str
    role: str
    size: int
    sha256: str
    variant: str = ""

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


@dataclass
class Variant:
    name: str
    quant: str = ""
    description: str = ""
    memory: int = 0
    boards: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # glob patterns pkg build tags files with


@dataclass
class Manifest:
    name: str
    version: str
    category: str
    description: str = ""
    license: str = ""
    requires: str = ""
    experts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    router: str = ""
    variants: list[Variant] = field(default_factory=list)
    files: list[FileEntry] = field(default_factory=list)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def files_for(self, variant: str = "") -> list[FileEntry]:
        """Files installed with `variant`: the common ones plus that variant's own."""
        return [f for f in self.files if not f.variant or f.variant == variant]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        return asdict(self)


def dump_manifest(m: Manifest) -> str:
    """The canonical package.toml text; build writes it, and its bytes are what gets hashed and signed."""
    pkg = {"name": m.name, "version": m.version, "category": m.category, "description": m.description,
           "license": m.license, "requires": m.requires, "experts": m.experts, "models": m.models,
           "router": m.router}
    lines = ["# Written by `hublab pkg build`; sizes and sha256 are checked on install.", "[package]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in pkg.items() if v not in ("", [])
              or k in ("name", "version", "category")]
    for v in m.variants:
        lines += ["", "[[variants]]", f"name = {toml_value(v.name)}"]
        if v.quant:
            lines.append(f"quant = {toml_value(v.quant)}")
        if v.description:
            lines.append(f"description = {toml_value(v.description)}")
        if v.memory:
            lines.append(f"memory = {v.memory}")
        if v.boards:
            lines.append(f"boards = {toml_value(v.boards)}")
        if v.files:
            lines.append(f"files = {toml_value(v.files)}")
    for f in m.files:
        lines += ["", "[[files]]", f"path = {toml_value(f.path)}", f"role = {toml_value(f.role)}",
                  f"size = {f.size}", f"sha256 = {toml_value(f.sha256)}"]
        if f.variant:
            lines.append(f"variant = {toml_value(f.variant)}")
    return "\n".join(lines) + "\n"


def manifest_from_dict(data: dict, source: str, *, built: bool = True) -> Manifest:
    """Validate a parsed package.toml and return it; `built=False` accepts a source manifest
    (files without size/sha256, variants with `files` patterns)."""
    schema = _schema()
    if not built:
        # A source manifest may leave out what build fills in.
        schema["required"] = ["package"]
        schema["properties"]["files"]["items"]["required"] = ["path"]
    # Unsafe paths get their own message before the schema's generic "form that is not allowed".
    for i, f in enumerate(data.get("files", []) if isinstance(data.get("files"), list) else []):
        if isinstance(f, dict) and isinstance(f.get("path"), str):
            safe_relpath(f["path"], f"{source}: files[{i}].path")
    errors = schema_errors(data, schema)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ManifestError(f"{source}: {errors[0]}{more}; fix package.toml to match packaging/package.schema.json")
    p = data["package"]
    try:
        SpecifierSet(p.get("requires", ""))
    except InvalidSpecifier:
        raise ManifestError(f"{source}: package.requires: {p['requires']!r} is not a PEP 440 version specifier; "
                            "write e.g. \">=0.1, <2\" or \"~=0.1.0\"") from None
    variants = [Variant(name=v["name"], quant=v.get("quant", ""), description=v.get("description", ""),
                        memory=v.get("memory", 0), boards=list(v.get("boards", [])),
                        files=list(v.get("files", [])))
                for v in data.get("variants", [])]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ManifestError(f"{source}: variants: a variant name is used twice; give each variant its own name")
    files = []
    seen: set[str] = set()
    for i, f in enumerate(data.get("files", [])):
        path = safe_relpath(f["path"], f"{source}: files[{i}].path")
        if path in RESERVED:
            raise ManifestError(f"{source}: files[{i}].path: {path!r} is reserved for the package manager; rename the "
                                "file")
        if path in seen:
            raise ManifestError(f"{source}: files[{i}].path: {path!r} is listed twice; list each file once")
        seen.add(path)
        variant = f.get("variant", "")
        if variant and variant not in names:
            raise ManifestError(f"{source}: files[{i}].variant: no variant named {variant!r}; "
                                f"add a [[variants]] entry or fix the name")
        files.append(FileEntry(path=path, role=f.get("role", ""), size=f.get("size", -1),
                               sha256=f.get("sha256", ""), variant=variant))
    # A file and a directory of the same name cannot both be installed.
    for path in seen:
        parent = str(PurePosixPath(path).parent)
        while parent not in (".", ""):
            if parent in seen:
                raise ManifestError(f"{source}: files: {parent!r} is both a file and a directory; rename one")
            parent = str(PurePosixPath(parent).parent)
    return Manifest(name=p["name"], version=p["version"], category=p["category"],
                    description=p.get("description", ""), license=p.get("license", ""),
                    requires=p.get("requires", ""), experts=list(p.get("experts", [])),
                    models=list(p.get("models", [])), router=p.get("router", ""),
                    variants=variants, files=files)


def parse_manifest(raw: bytes, source: str) -> Manifest:
    """Parse and validate built package.toml bytes (as downloaded or read)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"{source}: not valid TOML ({str(exc).splitlines()[0]}); rebuild the package "
                            "with hublab pkg build") from None
    return manifest_from_dict(data, source)


def digest_bytes(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# hublab version requirements ("requires")

def requirement_met(spec: str, version: str) -> bool:
    """'>=0.1, <2' or '~=0.1.0' against '0.1.0' (PEP 440, as pip reads it); an empty spec accepts anything.

    The running hublab is installed, so a pre-release of it satisfies '>=0.1' the way pip treats an
    installed pre-release; '<0.2' still excludes 0.2.0rc1. A spec or version PEP 440 cannot read fails.
    """
    try:
        return SpecifierSet(spec).contains(Version(version), installed=True)
    except (InvalidSpecifier, InvalidVersion):
        return False


# ---------------------------------------------------------------------------------------------------
# Reading a source directory for `pkg build`

def infer_role(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gguf"):
        try:
            from ..engine.memory import read_gguf

            return "adapter" if read_gguf(path).kind == "adapter" else "model"
        except (ValueError, OSError):
            return "model"
    if name.endswith(".onnx"):
        return "router"
    if name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.txt"):
        return "tokenizer"
    if name.endswith(".toml"):
        return "config"
    if name.endswith((".md", ".txt", ".rst")) or name.startswith(("readme", "license", "notice")):
        return "doc"
    return "data"


def source_files(directory: Path) -> list[str]:
    """Relative paths of the files in a package source dir (hidden files and our own files skipped).

    A symlink is followed only when it stays inside the directory; one that leads out is an error.
    """
    root = directory.resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for d in list(dirnames):
            if (base / d).is_symlink():
                raise ManifestError(f"{base / d}: a symlinked directory; replace it with a real directory")
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = base / name
            rel = p.relative_to(directory).as_posix()
            if rel in RESERVED:
                continue
            if p.is_symlink():
                real = p.resolve()
                if os.path.commonpath([root, real]) != str(root):
                    raise ManifestError(f"{p}: symlink points outside the package ({real}); copy the file in instead")
                if not real.is_file():
                    raise ManifestError(f"{p}: symlink to something that is not a file; copy the file in instead")
            elif not p.is_file():
                raise ManifestError(f"{p}: not a regular file; remove it from the package directory")
            out.append(safe_relpath(rel, str(p)))
    return out


def describe_models(directory: Path, paths: list[str]) -> tuple[list[str], list[str]]:
    """(expert names, base model names) declared by the model TOMLs among `paths`."""
    experts, models = [], []
    for rel in paths:
        if not rel.endswith(".toml") or PurePosixPath(rel).name in ("router.toml", "system.toml"):
            continue
        try:
            data = tomllib.loads((directory / rel).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ManifestError(f"{directory / rel}: not valid TOML ({str(exc).splitlines()[0]}); fix it") from None
        model = data.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            continue
        target = experts if model.get("type") == "expert" or "expert" in data else models
        if model["name"] not in target:
            target.append(model["name"])
        # An expert's examples route queries to it: the file must be one of the package's (signed) files.
        examples = data.get("expert", {}).get("examples_file") if isinstance(data.get("expert"), dict) else None
        if isinstance(examples, str) and examples:
            wanted = os.path.normpath((PurePosixPath(rel).parent / examples).as_posix())
            if wanted not in paths:
                raise ManifestError(f"{directory / rel}: [expert] examples_file {examples!r} is not in the package; "
                                    "put it beside the TOML so it is signed with the package")
    return experts, models


def variant_of(rel: str, patterns: dict[str, list[str]], source: str) -> str:
    hits = [name for name, pats in patterns.items() if any(fnmatch.fnmatchcase(rel, p) for p in pats)]
    if len(hits) > 1:
        raise ManifestError(f"{source}: {rel!r} matches the files of variants {', '.join(hits)}; "
                            "make the patterns exclusive")
    return hits[0] if hits else ""
