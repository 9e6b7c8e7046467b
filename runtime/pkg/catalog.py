"""The verbs that read a registry: `search` (packages matching a term) and `show` (one package, how each
of its variants fits the board, and its install record if installed)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import HublabError
from .manifest import Manifest, parse_manifest
from ..engine.profiles import Profile
from .registry import RegistryError, parse_ref, resolve
from .context import context, one_line_errors, opened
from .fit import plan
from .store import Store


def _summary(m: Manifest, tags: list[str] | None = None) -> dict:
    return {"name": m.name, "version": m.version, "category": m.category, "description": m.description,
            "license": m.license, "experts": m.experts, "models": m.models, "router": m.router,
            "size": m.size, "variants": [v.name for v in m.variants], "tags": tags or []}


@one_line_errors("searching the registry")
def search(term: str = "", registry: str | Path | None = None, *, config: str | Path | None = None) -> list[dict]:
    """Packages in a registry whose name, description, category, experts or models contain `term`."""
    ctx = context(config, registry=registry)
    needle = term.lower().strip()
    out = []
    with opened(ctx.registry) as reg:
        for name in reg.names():
            tags = reg.tags(name)
            if not tags:
                continue
            tag = "latest" if "latest" in tags else tags[-1]
            try:
                res = resolve(reg, name, tag)
                m = parse_manifest(res.package_raw, res.source)
            except HublabError:
                continue  # one broken entry does not hide the others
            hay = " ".join([m.name, m.description, m.category, *m.experts, *m.models]).lower()
            if needle in hay:
                out.append(_summary(m, tags) | {"signed": res.signature is not None})
    return out


@one_line_errors("showing the package")
def show(ref: str, registry: str | Path | None = None, *, models_dir: str | Path | None = None,
         profile: Profile | str | None = None, config: str | Path | None = None) -> dict:
    """A package's details: from the registry (with each variant's fit on the board) and, if installed, its record."""
    ctx = context(config, models_dir, registry, profile)
    name, tag = parse_ref(ref)
    rec = Store(ctx.models_dir).get(name)
    out: dict[str, Any] = {"name": name, "installed": rec.to_dict() if rec else None}
    try:
        with opened(ctx.registry) as reg:
            res = resolve(reg, name, tag)
            m = parse_manifest(res.package_raw, res.source)
            prof = ctx.profile
            out |= {"registry": ctx.registry, "tag": tag, "package": _summary(m, reg.tags(name)),
                    "files": [asdict(f) for f in m.files], "digest": res.package_digest,
                    "signed_by": res.signature.key if res.signature else "", "profile": prof.name,
                    "variants": [c.to_dict() | {"description": m.variant(c.variant).description if c.variant else ""}
                                 for c in plan(m, prof)]}
    except RegistryError as exc:
        if rec is None:
            raise
        out["registry_error"] = str(exc)
    return out
