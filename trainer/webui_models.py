"""The models of the training WebUI: the shell's model set for Chat and Evaluate, the bases a run can train
on, and "Install as expert" (an exported adapter GGUF becomes an expert TOML in the user's models dir).

The WebUI reads system.toml as the shell and the agent do: the user's models dir (packages and their own
TOMLs) over the embedded default set, or only `--models-dir` when one is given. An installed expert is a
TOML plus a copy of its adapter in `<models_dir>/experts/`, so it stays when the workspace goes, and the
shell, the agent and the WebUI all list it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from pathlib import Path

from hublab.runtime.config import (EMBEDDED_MODELS_DIR, Catalog, ModelConfig, SystemConfig, load_system,
                                   scan_models, toml_value)
from hublab.runtime.errors import HublabError

from . import webui_jobs as J
from .webui_data import WebError, check_name, inside

RESERVED = ("moe", "router")  # names the agent gives its routed answer and its encoder
MAX_EXAMPLES = 20


def system_config(models_dir: Path | None) -> tuple[SystemConfig, str]:
    """(the system config, '' or why system.toml could not be read: defaults are used then)."""
    error = ""
    try:
        system = load_system()
    except HublabError as exc:
        error = f"{exc} (using the defaults until it is fixed)"
        system = load_system(Path(os.devnull) / "absent.toml")
    if models_dir is not None:
        system.use_models_dir(models_dir)
    return system, error


def describe(catalog: Catalog) -> list[dict]:
    """Experts first, then bases; a base is marked as one (untuned: it may wander or loop on questions)."""
    rows = [{"name": n, "type": m.type, "expert": m.is_expert, "base": m.base or "", "description": m.description,
             "embedded": m.source.is_relative_to(EMBEDDED_MODELS_DIR)} for n, m in catalog.models.items()]
    return sorted(rows, key=lambda r: (not r["expert"], r["name"]))


# ---------------------------------------------------------------------------------------------------
# Bases

def gguf_kind(path: Path) -> str:
    """'model' or 'adapter' from a GGUF's header; '' when it is not a readable GGUF."""
    from hublab.runtime.engine.memory import read_gguf

    try:
        return read_gguf(path).kind
    except (HublabError, OSError, ValueError):
        return ""


def workspace_ggufs(ws: Path, kind: str) -> list[str]:
    """Workspace-relative GGUFs of one kind ('model' or 'adapter') under exports/ and models/."""
    out = []
    for sub in ("exports", "models"):
        for p in sorted((ws / sub).rglob("*.gguf")):
            if not any(part.startswith(".") for part in p.relative_to(ws).parts) and gguf_kind(p) == kind:
                out.append(p.relative_to(ws).as_posix())
    return out


def train_bases(ws: Path) -> list[dict]:
    """What `[train] base` can be: the embedded bases by name, and HF dirs and GGUF models in the workspace."""
    out = []
    try:
        embedded = scan_models(EMBEDDED_MODELS_DIR)
    except (HublabError, OSError):
        embedded = Catalog({}, [])
    for name, m in sorted(embedded.models.items()):
        if m.type == "base":
            out.append({"value": name, "label": f"{name} (embedded base: {m.description or 'GGUF'})"})
    models = ws / "models"
    for p in sorted(models.rglob("config.json")):
        rel = p.parent.relative_to(ws).as_posix()
        out.append({"value": rel, "label": f"{rel} (HF model dir)"})
    for rel in workspace_ggufs(ws, "model"):
        out.append({"value": rel, "label": f"{rel} (GGUF)"})
    return out


def runtime_bases(catalog: Catalog, ws: Path) -> list[dict]:
    """What an installed expert can run on: the base models the runtime knows, and GGUF models of the
    workspace (installing on one of those adds a base TOML for it)."""
    out = [{"value": n, "label": f"{n} (base{': ' + m.description if m.description else ''})"}
           for n, m in sorted(catalog.models.items()) if m.type == "base" and not m.base]
    out += [{"value": rel, "label": f"{rel} (GGUF in the workspace)"} for rel in workspace_ggufs(ws, "model")]
    return out


# ---------------------------------------------------------------------------------------------------
# Install as expert

def _run_of(ws: Path, adapter_rel: str) -> str:
    """The training run an exported adapter came from ('' when unknown): the export job that wrote it, or
    the training whose [export] adapter it is."""
    for job in J.all_jobs(ws):
        if adapter_rel not in job.outputs and not (job.kind == "train" and (job.config.get("export") or {})
                                                   .get("adapter") == Path(adapter_rel).name):
            continue
        if job.kind == "train":
            return job.name
        m = re.match(r"^runs/([^/]+)/", str(job.config.get("source") or ""))
        if job.kind == "export" and m:
            return m.group(1)
    return ""


def _run_config(ws: Path, run: str) -> dict:
    path = ws / "runs" / run / "expert.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")) if run and path.is_file() else {}
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _base_for_runtime(ws: Path, catalog: Catalog, train_base: str) -> str:
    """The runtime base an adapter trained on `train_base` runs on: the same model by name or file, or the
    GGUF an export job made from the same HF dir; '' when there is none yet."""
    from hublab.runtime.config import resolve_model_path

    if not train_base:
        return ""
    if train_base in catalog.models and not catalog.models[train_base].base:
        return train_base
    try:
        wanted = resolve_model_path(train_base, ws).resolve() if train_base.startswith("pypi:") or \
            train_base.endswith(".gguf") else None
    except (OSError, HublabError):
        wanted = None
    for name, m in sorted(catalog.models.items()):
        if wanted is not None and m.path is not None and not m.base and Path(m.path).resolve() == wanted:
            return name
    src = Path(train_base)
    for job in J.all_jobs(ws):  # an HF dir converted to GGUF here: the newest such export
        if job.kind == "export" and job.config.get("kind") == "gguf" and J.status(job) == "done":
            try:
                same = inside(ws, str(job.config.get("source") or "")) == (src if src.is_absolute() else ws / src)
            except WebError:
                same = False
            if same and job.outputs:
                return job.outputs[0]
    if src.is_absolute() and src.suffix == ".gguf":
        try:
            return Path(src).resolve().relative_to(ws).as_posix()
        except ValueError:
            return ""
    return ""


def _examples(ws: Path, cfg: dict) -> list[str]:
    """The first user questions of the run's data: what the router matches queries against."""
    from . import data as D

    out: list[str] = []
    for d in cfg.get("data") or []:
        try:
            examples = D.load_examples(D.DataSpec(Path(d["path"]), 1.0, d.get("format", "auto"), d.get("name", "")))
        except (HublabError, OSError, KeyError, TypeError):
            continue
        for ex in examples:
            q = next((m["content"].strip() for m in ex.messages if m["role"] == "user"), "")
            if q and q not in out and len(q) <= 300:
                out.append(q)
            if len(out) >= MAX_EXAMPLES:
                return out
    return out


def install_defaults(ws: Path, catalog: Catalog, install_dir: Path, adapter: str) -> dict:
    """The form "Install as expert" opens with, from the run that made `adapter`."""
    path = _adapter(ws, adapter)
    run = _run_of(ws, adapter)
    cfg = _run_config(ws, run)
    train = cfg.get("train") or {}
    name = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem)[:64].lstrip(".-") or "expert"
    sets = [Path(str(d.get("path", ""))).name for d in cfg.get("data") or []]
    template = str(train.get("template") or "auto")
    return {"adapter": adapter, "name": name, "run": run,
            "base": _base_for_runtime(ws, catalog, str(train.get("base") or "")),
            "bases": runtime_bases(catalog, ws),
            "description": f"LoRA expert trained on {', '.join(sets)}" if sets else "LoRA expert",
            "examples": _examples(ws, cfg), "chat_format": template,
            "dir": str(install_dir / "experts"), "shadows": name in catalog.models}


def _adapter(ws: Path, adapter: str) -> Path:
    path = inside(ws, adapter)
    if not path.is_file():
        raise WebError(f"adapter {adapter!r}: no such file in the workspace; export a run's adapter GGUF first", 404)
    if gguf_kind(path) != "adapter":
        raise WebError(f"adapter {adapter!r}: not a LoRA adapter GGUF; choose what Export's 'adapter GGUF' made")
    return path


def install_plan(ws: Path, catalog: Catalog, install_dir: Path, form: dict) -> dict:
    """The files "Install as expert" writes (TOML text included); checked, nothing written."""
    from hublab.runtime.chat import FORMATS

    adapter = _adapter(ws, str(form.get("adapter") or ""))
    name = check_name(str(form.get("name") or ""), "name")
    if name in RESERVED:
        raise WebError(f"name {name!r}: reserved for the agent's {name}; choose another name")
    if name in catalog.models and not catalog.models[name].is_expert:
        raise WebError(f"name {name!r}: a base model has this name; choose another name")
    base = str(form.get("base") or "").strip()
    known = [b["value"] for b in runtime_bases(catalog, ws)]
    if not base:
        raise WebError("base: choose the base model the adapter was trained on"
                       + (f" ({', '.join(known)})" if known else "; export the run's base as a GGUF first"))
    experts = install_dir / "experts"
    files: dict[str, str] = {}
    base_toml = ""
    if base.endswith(".gguf"):
        gguf = inside(ws, base)
        if gguf_kind(gguf) != "model":
            raise WebError(f"base {base!r}: not a GGUF model in the workspace; choose one of {', '.join(known)}")
        base_name = check_name(re.sub(r"[^A-Za-z0-9._-]", "-", gguf.stem)[:64], "base name")
        have = catalog.models.get(base_name)
        if have is not None and (have.path is None or Path(have.path).resolve() != gguf):
            raise WebError(f"base {base!r}: a model named {base_name!r} exists already ({have.source}); "
                           "rename the GGUF")
        if have is None:
            base_toml = str(install_dir / f"{base_name}.toml")
            files[base_toml] = ("# written by hublab webui: a base model from the trainer's workspace\n[model]\n"
                                f"name = {toml_value(base_name)}\ntype = \"base\"\npath = {toml_value(str(gguf))}\n"
                                f"description = {toml_value('GGUF made by hublab export in ' + str(ws))}\n")
        base = base_name
    elif base not in catalog.models or catalog.models[base].base:
        raise WebError(f"base {base!r}: not a base model here; choose one of {', '.join(known) or '(none yet)'}")
    fmt = str(form.get("chat_format") or "auto")
    if fmt not in FORMATS:
        raise WebError(f"chat_format {fmt!r}: use {', '.join(FORMATS)} (the template the run trained with)")
    examples = form.get("examples") or []
    if isinstance(examples, str):
        examples = examples.splitlines()
    if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
        raise WebError("examples: give a list of example questions (one a line)")
    examples = [e.strip() for e in examples if e.strip()]
    description = str(form.get("description") or "").strip().replace("\n", " ")
    toml_path = experts / f"{name}.toml"
    lines = ["# written by hublab webui (Install as expert)" + (f" from run {form['run']}" if form.get("run") else ""),
             "[model]", f"name = {toml_value(name)}", 'type = "expert"', f"description = {toml_value(description)}"]
    if fmt != "auto":
        lines.append(f"chat_format = {toml_value(fmt)}")
    lines += ["", "[expert]", f"domain = {toml_value(name)}", f"base = {toml_value(base)}",
              f"adapter = {toml_value(name + '.gguf')}"]
    if examples:
        lines.append("examples = [\n" + "".join(f"  {json.dumps(e, ensure_ascii=False)},\n" for e in examples) + "]")
    files[str(toml_path)] = "\n".join(lines) + "\n"
    return {"name": name, "base": base, "toml": files[str(toml_path)], "path": str(toml_path),
            "adapter_path": str(experts / f"{name}.gguf"), "source": str(adapter), "base_toml": base_toml,
            "files": files, "exists": toml_path.exists(),
            "shadows": name in catalog.models and catalog.models[name].source != toml_path}


def install(plan: dict, system: SystemConfig, replace: bool = False) -> Catalog:
    """Write the plan's files (the adapter copied beside its TOML); refuses to overwrite unless `replace`.
    The catalog read afterwards must hold the expert, else what was written is removed again."""
    if plan["exists"] and not replace:
        raise WebError(f"name {plan['name']!r}: an expert is installed at {plan['path']}; tick replace or "
                       "choose another name", 409)
    written: list[Path] = []
    new: list[Path] = []  # files that were not there before: the ones a failed install takes away again
    try:
        for path, text in [(plan["adapter_path"], None), *plan["files"].items()]:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                new.append(p)
            tmp = p.with_name(f".{p.name}.tmp")
            if text is None:
                shutil.copyfile(plan["source"], tmp)
            else:
                tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, p)
            written.append(p)
        catalog = scan_models(system.model_dirs)
        bad = [e for e in catalog.errors if any(str(p) in e for p in written)]
        got: ModelConfig | None = catalog.models.get(plan["name"])
        if bad or got is None or Path(got.source) != Path(plan["path"]):
            raise WebError(f"{plan['path']}: the runtime could not read the expert ({'; '.join(bad) or 'not listed'})",
                           422)
        return catalog
    except BaseException:
        for p in new:
            p.unlink(missing_ok=True)
        raise
