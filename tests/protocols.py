"""A check that a class implements a typing.Protocol: every attribute the protocol declares exists (or is
declared, for one set in __init__), and every method takes the protocol's arguments (same names, kinds and
defaults, in order); a class may add arguments only with defaults. Used by test_client.py and
test_registry.py."""
from __future__ import annotations

import inspect


def protocol_members(proto: type) -> tuple[list[str], list[str]]:
    """(methods, data attributes) the protocol declares."""
    methods = [n for n, v in vars(proto).items() if not n.startswith("_") and callable(v)]
    return methods, [n for n in getattr(proto, "__annotations__", {}) if not n.startswith("_")]


def signature_problems(proto: type, cls: type) -> list[str]:
    """What keeps `cls` from implementing `proto`; [] when nothing does."""
    methods, attrs = protocol_members(proto)
    declared = {n for c in cls.__mro__ for n in getattr(c, "__annotations__", {})}  # instance attributes
    out = [f"{cls.__name__} has no {a}" for a in attrs if not hasattr(cls, a) and a not in declared]
    for name in methods:
        impl = getattr(cls, name, None)
        if not callable(impl):
            out.append(f"{cls.__name__} has no method {name}")
            continue
        want = list(inspect.signature(getattr(proto, name)).parameters.values())
        have = list(inspect.signature(impl).parameters.values())
        for w, h in zip(want, have):
            if (w.name, w.kind, w.default) != (h.name, h.kind, h.default):
                out.append(f"{cls.__name__}.{name}: {h} where {proto.__name__} has {w}")
        if len(have) < len(want):
            out.append(f"{cls.__name__}.{name} lacks {[p.name for p in want[len(have):]]}")
        extra = [p for p in have[len(want):] if p.default is p.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if extra:
            out.append(f"{cls.__name__}.{name} requires {[p.name for p in extra]}, which {proto.__name__} "
                       "does not pass")
    return out
