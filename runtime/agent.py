"""`hublab serve`: the device agent, an HTTP API over the same runtime the shell uses.

`Device` is the set of operations a device offers (list, load, unload, info, config, stats, benchmark,
route, ask, settings) over one `Runtime` and `MoE`. The `hublab>` shell calls it in-process; the agent
serves the same operations over HTTP, so `hublab shell --remote URL` behaves like the local shell.

Endpoints (JSON unless noted):

    GET  /health                  status, version, profile, loaded models
    GET  /metrics                 Prometheus text: requests, tokens, tokens/s, queue depth, memory
    GET  /v1/models               OpenAI model list: every model and expert, plus "moe"
    POST /v1/chat/completions     OpenAI chat; model = an expert name or "moe"; "stream": true -> SSE
    POST /v1/completions          OpenAI text completion (raw prompt), same models and streaming
    GET  /api/experts             models and experts on disk (size, quant, loaded, memory estimate)
    POST /api/load, /api/unload   {"name": ...}
    POST /api/route               {"query": ..., "routing": optional} -> every score and the selection
    POST /api/ask                 {"query": ..., "stream": true} -> SSE of the MoE's progress events
    GET|POST /api/settings        routing and synthesis (POST sets and saves them to system.toml)
    GET  /api/info?name=  GET /api/stats  POST /api/config  POST /api/benchmark

llama.cpp contexts are not thread-safe, so the agent runs one generation at a time per loaded base: a
generation waits for its base in a bounded queue (`[agent] queue_size`) and a full queue answers 503
with Retry-After. A client that disconnects cancels its generation, also while it is still queued.
Binding a non-loopback address needs a token (`[agent] token` or $HUBLAB_TOKEN); with a token set,
every request must send `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from hublab import __version__

from .config import MODEL_SCHEMA, SYSTEM_SCHEMA, Key, load_model, load_system, set_system_value, toml_value
from .errors import HublabError

MAX_BODY = 1 << 20
BENCH_PROMPT = "Explain in a few sentences how a Raspberry Pi starts up after power is applied."
# `ai config KEY VALUE`: a bare key names its system.toml section (keys are unique across sections).
SYSTEM_KEYS = {key: section for section, keys in SYSTEM_SCHEMA.items() if section != "trust" for key in keys}
INFERENCE_KEYS = MODEL_SCHEMA["inference"]
RESTART_KEYS = {"host", "port", "token", "queue_size"}


def _coerce(key: str, value: Any, spec: Key) -> Any:
    """A value typed at the shell (always a string) or sent as JSON, converted to what `spec` wants."""
    types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
    if not isinstance(value, str):
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    if list in types:
        try:
            return json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        except json.JSONDecodeError:
            pass
    elif bool in types:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
    else:
        # the narrowest type that reads the text: "8" is an int, "0.5" a float, "10m" a string
        for kind in (int, float, str):
            if kind in types:
                with contextlib.suppress(ValueError):
                    return kind(text)
    raise HublabError(f"{key}: {value!r} is not {_kind(types)} ({spec.help}); give a value like "
                      f"{_example(types)}")


def _kind(types: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _example(types: tuple) -> str:
    return {int: "512", float: "0.7", bool: "true", list: "a,b", str: "text"}.get(types[0], "1")


def set_toml_key(text: str, section: str, key: str, value: Any) -> str:
    """`text` with `key = value` set inside `[section]`; comments and the other lines are kept."""
    lines = text.splitlines()
    line = f"{key} = {toml_value(value)}"
    start = next((i for i, raw in enumerate(lines) if raw.strip() == f"[{section}]"), None)
    if start is None:
        return text.rstrip("\n") + f"\n\n[{section}]\n{line}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("[")), len(lines))
    for i in range(start + 1, end):
        if lines[i].split("=", 1)[0].strip().strip('"') == key and "=" in lines[i]:
            lines[i] = line
            return "\n".join(lines) + "\n"
    last = max((i for i in range(start, end) if lines[i].strip()), default=start)
    lines.insert(last + 1, line)
    return "\n".join(lines) + "\n"


def _package_of(source: Path, models_dir: Path) -> Path | None:
    """The installed package directory holding `source`, if any (its files are hashed by pkg verify)."""
    for parent in source.parents:
        if (parent / "package.toml").is_file():
            return parent
        if parent == models_dir or parent == parent.parent:
            return None
    return None


class Device:
    """What a device offers, in-process: the shell uses it directly, the agent serves it over HTTP."""

    def __init__(self, runtime, moe=None):
        self.rt = runtime
        self._moe = moe
        self._moe_lock = threading.Lock()
        self._bench_runs = 0

    @classmethod
    def open(cls, config: str | Path | None = None, profile: str | None = None) -> "Device":
        from .engine import Runtime

        return cls(Runtime.from_config(Path(config) if config else None, profile=profile))

    @property
    def moe(self):
        """The MoE, made on first use, so a broken [moe] setting does not stop `ai list`."""
        with self._moe_lock:
            if self._moe is None:
                from .moe import MoE

                self._moe = MoE(self.rt)
            return self._moe

    def close(self) -> None:
        self.rt.close()

    # -- models -----------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.rt.models)

    def list(self) -> dict:
        return {"models": self.rt.status(), "errors": list(self.rt.catalog.errors),
                "profile": self.rt.profile.name, "budget": self.rt.budget, "used": self.rt.used_memory()}

    def base_of(self, name: str) -> str:
        """The base whose llama.cpp context runs `name` (itself for a base or standalone expert)."""
        cfg = self.rt.config(name)
        return cfg.base or cfg.name

    def load(self, name: str) -> dict:
        t0 = time.perf_counter()
        self.rt.load(name)
        return {"name": name, "seconds": round(time.perf_counter() - t0, 3), "loaded": self.rt.loaded(),
                "used": self.rt.used_memory(), "budget": self.rt.budget}

    def unload(self, name: str) -> dict:
        gone = self.rt.unload(name)
        return {"name": name, "unloaded": gone, "loaded": self.rt.loaded(), "used": self.rt.used_memory()}

    def rescan(self) -> dict:
        """Re-read the models dir (after a package install) and reopen the router on next use."""
        catalog = self.rt.rescan()
        with self._moe_lock:
            if self._moe is not None:
                routing, synthesis = self._moe.routing, self._moe.synthesis
                from .moe import MoE

                self._moe = MoE(self.rt)
                self._moe.set(routing=routing, synthesis=synthesis)
        return {"models": sorted(catalog.models), "errors": list(catalog.errors)}

    def info(self, name: str | None = None) -> dict:
        """The runtime (no name), or one model: parameters, quantization, context, memory, last tokens/s."""
        import psutil

        rt = self.rt
        mem = {"used": rt.used_memory(), "budget": rt.budget, "rss": psutil.Process().memory_info().rss}
        if not name:
            return {"profile": rt.profile.name, "profile_description": rt.profile.description,
                    "threads": rt.threads, "keep_alive": rt.keep_alive, "models_dir": str(rt.system.models_dir),
                    "config": str(rt.system.path) if rt.system.path else None, "loaded": rt.loaded(),
                    "models": len(rt.models), "experts": len(rt.experts), "memory": mem}
        from .memory import read_gguf

        cfg = rt.config(name)
        owner = rt.models[cfg.base] if cfg.base else cfg
        est = rt.estimate(name)  # first: it names a missing GGUF with the fix
        info = read_gguf(owner.path)
        stats = rt.stats.get(name)
        return {"name": cfg.name, "type": cfg.type, "description": cfg.description, "base": cfg.base or None,
                "domain": cfg.domain if cfg.is_expert else None, "keywords": cfg.keywords,
                "threshold": cfg.threshold, "source": str(cfg.source), "file": str(owner.path),
                "adapter": str(cfg.adapter) if cfg.adapter else None, "scale": cfg.scale if cfg.adapter else None,
                "arch": info.arch, "parameters": info.n_params, "quant": info.file_type,
                "context_size": rt.context_size(cfg), "trained_context": info.context_length,
                "inference": asdict(cfg.inference), "loaded": rt.is_loaded(name),
                "estimate": {"weights": est.weights, "kv_cache": est.kv_cache, "compute": est.compute,
                             "total": est.total},
                "memory": mem, "last_tokens_per_s": stats.last_tokens_per_s if stats else None}

    def stats(self) -> dict:
        import psutil

        return {"experts": {n: s.to_dict() for n, s in sorted(self.rt.stats.items())}, "loaded": self.rt.loaded(),
                "memory": {"used": self.rt.used_memory(), "budget": self.rt.budget,
                           "rss": psutil.Process().memory_info().rss}}

    # -- settings -----------------------------------------------------------------------------------------

    def config(self, key: str, value: Any, name: str | None = None) -> dict:
        """Set one setting and save it: a system.toml key, or a sampler key of model `name` (its TOML)."""
        if name:
            return self._config_model(name, key, value)
        if key in SYSTEM_KEYS:
            return self._config_system(SYSTEM_KEYS[key], key, value)
        if key in INFERENCE_KEYS:
            some = next(iter(sorted(self.rt.experts)), "NAME")
            raise HublabError(f"{key}: is set per model in this build (system.toml has no [inference] section); "
                              f"name the model, e.g. `ai config {some} {key} {value}`")
        import difflib

        keys = sorted(set(SYSTEM_KEYS) | set(INFERENCE_KEYS))
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(keys)}"
        raise HublabError(f"unknown setting {key!r}; {hint}")

    def _config_system(self, section: str, key: str, value: Any) -> dict:
        path = self.rt.system.path
        if path is None:
            raise HublabError("no system.toml path in use; start with --config FILE or set HUBLAB_CONFIG")
        value = _coerce(key, value, SYSTEM_SCHEMA[section][key])
        if section == "moe" and key in ("routing", "synthesis"):
            self.moe.set(**{key: value})  # validates before anything is written
        set_system_value(path, section, key, value)
        system = load_system(path)
        applies = "now"
        rt = self.rt
        if section == "runtime":
            rt.system = system
            if key == "threads":
                rt.threads = system.threads or rt.profile.threads
                applies = "next load"
            elif key == "max_memory":
                rt.max_memory = system.max_memory
            elif key == "keep_alive":
                rt.keep_alive = system.keep_alive
            elif key == "profile":
                from .profiles import active_profile

                rt.profile = active_profile(system.profile)
                applies = "next load"
            elif key == "models_dir":
                self.rescan()
        elif section == "moe":
            for k in ("routing", "synthesis", "fallback", "router_dir", "keyword_weight", "aggregator"):
                setattr(rt.system, k, getattr(system, k))
            if key not in ("routing", "synthesis"):
                with self._moe_lock:
                    self._moe = None  # the router and fallback are read when the MoE is made
        elif key in RESTART_KEYS:
            applies = "agent restart"
        return {"key": key, "value": value, "section": section, "saved_to": str(path), "applies": applies}

    def _config_model(self, name: str, key: str, value: Any) -> dict:
        cfg = self.rt.config(name)
        if key not in INFERENCE_KEYS:
            raise HublabError(f"{key}: not a model setting; model settings are {', '.join(INFERENCE_KEYS)} "
                              f"(system settings take no model name: `ai config {key} VALUE`)")
        pkg = _package_of(cfg.source, self.rt.system.models_dir)
        if pkg is not None:
            raise HublabError(f"{cfg.source} belongs to the installed package in {pkg}, whose files `pkg verify` "
                              "checks; copy the TOML out of the package to change it")
        value = _coerce(key, value, INFERENCE_KEYS[key])
        text = cfg.source.read_text(encoding="utf-8")
        tmp = cfg.source.with_name(f".{cfg.source.name}.tmp")
        tmp.write_text(set_toml_key(text, "inference", key, value), encoding="utf-8")
        try:
            load_model(tmp)  # a bad value never replaces the file
        except HublabError as exc:
            tmp.unlink()
            raise HublabError(str(exc).replace(str(tmp), str(cfg.source))) from None
        os.replace(tmp, cfg.source)
        self.rt.rescan()
        applies = "next load" if key == "context_size" and self.rt.is_loaded(name) else "now"
        return {"key": key, "value": value, "model": name, "saved_to": str(cfg.source), "applies": applies}

    def settings(self, routing: str | None = None, synthesis: str | None = None, save: bool = True) -> dict:
        """Show routing and synthesis; with values, set them (validated) and save them to system.toml."""
        moe = self.moe
        if routing or synthesis:
            moe.set(routing=routing, synthesis=synthesis)
            path = self.rt.system.path
            if save and path is not None:
                for key, value in (("routing", routing), ("synthesis", synthesis)):
                    if value:
                        set_system_value(path, "moe", key, value)
                        setattr(self.rt.system, key, value)
        s = self.rt.system
        return {"routing": moe.routing, "synthesis": moe.synthesis, "fallback": moe.fallback,
                "keyword_weight": s.keyword_weight, "aggregator": s.aggregator or moe.fallback,
                "router": "onnx" if moe.router is not None else "keywords",
                "config": str(s.path) if s.path else None}

    # -- answers --------------------------------------------------------------------------------------------

    def route(self, query: str, routing: str | None = None) -> dict:
        return self.moe.route(query, routing).to_dict()

    def ask_bases(self, query: str, routing: str | None = None, synthesis: str | None = None) -> list[str]:
        """Bases an `ask` will generate on: its selected experts', and the aggregator's for summarize."""
        names = list(self.moe.route(query, routing).names)
        if (synthesis or self.moe.synthesis) == "summarize":
            names.append(self.rt.system.aggregator or self.moe.fallback)
        return sorted({self.base_of(n) for n in names if n in self.rt.models})

    def ask(self, query: str, routing: str | None = None, synthesis: str | None = None,
            on_event: Callable[[str, dict], None] | None = None, cancel: threading.Event | None = None,
            max_tokens: int | None = None) -> dict:
        if not query.strip():
            raise HublabError("empty question; type one after ?, e.g. ?what is a list comprehension")
        return self.moe.ask(query, routing=routing, synthesis=synthesis, on_event=on_event, cancel=cancel,
                            max_tokens=max_tokens).to_dict()

    def benchmark_target(self, name: str | None = None) -> str:
        if name:
            self.rt.config(name)
            return name
        experts = self.rt.experts
        loaded = [n for n in self.rt.loaded() if n in experts]
        if loaded:
            return loaded[0]
        fallback = self.rt.system.fallback
        if fallback in self.rt.models:
            return fallback
        if not self.rt.models:
            raise HublabError(f"no models in {self.rt.system.models_dir}; install a package or add model TOMLs")
        return sorted(experts or self.rt.models)[0]

    def benchmark(self, name: str | None = None, max_tokens: int = 64, cancel: threading.Event | None = None) -> dict:
        """Prompt and generation tokens/s of one model on a fixed prompt (the KV cache is not reused)."""
        name = self.benchmark_target(name)
        t0 = time.perf_counter()
        was_loaded = self.rt.is_loaded(name)
        self.rt.load(name)
        load_s = time.perf_counter() - t0
        self._bench_runs += 1
        # A different first word each run: llama.cpp would otherwise reuse the cached prompt and the
        # prompt speed would measure nothing.
        prompt = f"Run {self._bench_runs}. {BENCH_PROMPT}"
        r = self.rt.generate(name, prompt, max_tokens=max_tokens, cancel=cancel, temperature=0.0)
        return {"name": name, "load_s": None if was_loaded else round(load_s, 3), "prompt_tokens": r.prompt_tokens,
                "prompt_tokens_per_s": round(r.prompt_tokens / r.ttft_s, 1) if r.ttft_s else None,
                "tokens": r.tokens, "tokens_per_s": r.tokens_per_s, "ttft_s": r.ttft_s, "seconds": r.seconds,
                "finish_reason": r.finish_reason, "rss": r.rss_bytes, "threads": self.rt.threads,
                "profile": self.rt.profile.name}

    # -- about ------------------------------------------------------------------------------------------------

    def version(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            llama = version("llama-cpp-python")
        except PackageNotFoundError:
            llama = None
        return {"hublab": __version__, "llama_cpp_python": llama, "python": sys.version.split()[0],
                "profile": self.rt.profile.name, "where": "local"}

    def health(self) -> dict:
        return {"status": "ok", "version": __version__, "profile": self.rt.profile.name,
                "loaded": self.rt.loaded(), "models": len(self.rt.models)}


# ---------------------------------------------------------------------------------------------------
# One generation per base, a bounded queue, cancellation

class QueueFull(HublabError):
    """Every queue slot is taken."""


class Cancelled(Exception):
    """The client went away before its turn came."""


class Gate:
    """One generation at a time per base; at most `size` requests wait. Locks are taken in name order,
    so a request that needs two bases cannot deadlock against another."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._bases: dict[str, threading.Lock] = {}
        self.waiting = 0
        self.running = 0

    @contextlib.contextmanager
    def enter(self, bases: list[str], cancel: threading.Event):
        with self._lock:
            if self.waiting >= self.size:
                raise QueueFull(f"the agent's queue is full ({self.size} waiting); retry shortly")
            self.waiting += 1
            locks = [self._bases.setdefault(b, threading.Lock()) for b in sorted(set(bases))]
        held: list[threading.Lock] = []
        try:
            for lock in locks:
                # poll so that a client who leaves while queued gives up its place
                while not lock.acquire(timeout=0.05):
                    if cancel.is_set():
                        raise Cancelled
                held.append(lock)
        except BaseException:
            for lock in reversed(held):
                lock.release()
            with self._lock:
                self.waiting -= 1
            raise
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            yield
        finally:
            for lock in reversed(held):
                lock.release()
            with self._lock:
                self.running -= 1


@contextlib.contextmanager
def watch_disconnect(sock: socket.socket, cancel: threading.Event, interval: float = 0.1):
    """Set `cancel` when the peer closes `sock` while we work (a readable socket with nothing to read)."""
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], interval)
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    cancel.set()
                    return
            except (OSError, ValueError):
                cancel.set()
                return
            if readable:
                stop.wait(interval)  # pipelined bytes wait for us; do not spin on them

    thread = threading.Thread(target=run, name="hublab-disconnect-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Metrics:
    """Counters for /metrics; tokens and tokens/s come from the runtime's per-expert stats."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.rejected = 0
        self.cancelled = 0
        self.started = time.time()

    def count(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def bump(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def render(self, agent: "Agent") -> str:
        import psutil

        rt = agent.device.rt
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        with self._lock:
            reqs = sorted(self.requests.items())
        metric("hublab_requests_total", "counter", "HTTP requests by path and status code",
               [(f'{{path="{p}",code="{c}"}}', n) for (p, c), n in reqs])
        metric("hublab_rejected_total", "counter", "generation requests answered 503 (queue full)",
               [("", self.rejected)])
        metric("hublab_cancelled_total", "counter", "generations cancelled because the client went away",
               [("", self.cancelled)])
        stats = sorted(rt.stats.items())
        metric("hublab_generated_tokens_total", "counter", "tokens generated per expert",
               [(f'{{expert="{n}"}}', s.tokens) for n, s in stats])
        metric("hublab_prompt_tokens_total", "counter", "prompt tokens evaluated per expert",
               [(f'{{expert="{n}"}}', s.prompt_tokens) for n, s in stats])
        metric("hublab_generations_total", "counter", "generations per expert",
               [(f'{{expert="{n}"}}', s.calls) for n, s in stats])
        metric("hublab_generation_seconds_total", "counter", "seconds spent generating per expert",
               [(f'{{expert="{n}"}}', round(s.seconds, 4)) for n, s in stats])
        metric("hublab_tokens_per_second", "gauge", "generation speed of the expert's last answer",
               [(f'{{expert="{n}"}}', s.last_tokens_per_s) for n, s in stats])
        metric("hublab_queue_depth", "gauge", "generation requests waiting for their base", [("", agent.gate.waiting)])
        metric("hublab_generations_running", "gauge", "generations running now", [("", agent.gate.running)])
        metric("hublab_queue_capacity", "gauge", "requests that may wait before 503", [("", agent.gate.size)])
        metric("hublab_models_loaded", "gauge", "loaded models and adapter experts", [("", len(rt.loaded()))])
        metric("hublab_model_memory_bytes", "gauge", "estimated memory of the loaded models", [("", rt.used_memory())])
        metric("hublab_model_budget_bytes", "gauge", "the board profile's model memory budget", [("", rt.budget)])
        metric("hublab_resident_memory_bytes", "gauge", "resident memory of the agent process",
               [("", psutil.Process().memory_info().rss)])
        metric("hublab_uptime_seconds", "gauge", "seconds since the agent started",
               [("", round(time.time() - self.started, 1))])
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------
# HTTP

class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _now() -> int:
    return int(time.time())


def _text_of(content: Any) -> str:
    """An OpenAI message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ApiError(400, "messages[].content must be a string or a list of text parts")


def _sampler(body: dict) -> dict:
    """OpenAI request fields -> Runtime.stream keyword arguments (checked, so a bad one is a 400)."""
    opts: dict[str, Any] = {}
    numeric = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float,
               "repeat_penalty": float, "seed": int}
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    for key, kind in numeric.items():
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
            raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
        if key == "max_tokens" and v < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {v!r}")
        opts[key] = kind(v)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop must be a string or a list of non-empty strings")
        opts["stop"] = stop
    return opts


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"hublab/{__version__}"
    agent: "Agent"  # set on the subclass the Agent makes

    # -- plumbing ---------------------------------------------------------------------------------------------

    def log_message(self, fmt: str, *args) -> None:
        if not self.agent.quiet:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        path = url.path.rstrip("/") or "/"
        self.query = parse_qs(url.query)
        self.status = 0
        self.cancel = threading.Event()
        self.gone = False
        self.streaming = False
        self.completed = False   # the whole response went out; a disconnect after that cancels nothing
        self.body_read = False
        route = ROUTES.get(path)
        label = path if route else "other"
        try:
            if self.agent.token and not self._authorized():
                raise ApiError(401, "missing or wrong bearer token; send the header Authorization: Bearer <token>",
                               "invalid_api_key", {"WWW-Authenticate": 'Bearer realm="hublab"'})
            if route is None:
                raise ApiError(404, f"no endpoint {path}; see /v1/models, /api/experts, /health, /metrics", "not_found")
            if method not in route:
                raise ApiError(405, f"{path} takes {' or '.join(route)}", "method_not_allowed",
                               {"Allow": ", ".join(route)})
            route[method](self)
        except ApiError as exc:
            self._error(exc.status, exc.message, exc.code, exc.headers)
        except QueueFull as exc:
            self.agent.metrics.bump("rejected")
            self._error(503, str(exc), "queue_full", {"Retry-After": str(self.agent.retry_after())})
        except (Cancelled, BrokenPipeError, ConnectionResetError):
            if self.cancel.is_set():
                self.agent.metrics.bump("cancelled")
            self.close_connection = True
            self.status = self.status or 499  # nginx's "client closed request", for the request counter
        except HublabError as exc:
            unknown = str(exc).startswith("no model or expert named")
            self._error(404 if unknown else 400, str(exc), "model_not_found" if unknown else "invalid_request_error")
        except Exception as exc:  # noqa: BLE001 - one request must not take the agent down
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"internal error: {exc.__class__.__name__}: {exc}", "internal_error")
        finally:
            if not self.body_read and self.headers.get("Content-Length", "0") not in ("", "0"):
                # an unread body would be parsed as the next request on this connection
                self.close_connection = True
            self.agent.metrics.count(label, self.status)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.agent.token.encode())

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        self.body_read = True
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body is not valid JSON ({exc}); send a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.completed = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj, default=str).encode(), "application/json", headers)

    def _error(self, status: int, message: str, code: str, headers: dict | None = None) -> None:
        if self.streaming:
            # Headers are gone already: the error travels as the last event, like OpenAI's.
            self._sse({"error": {"message": message, "type": code, "code": code}})
            return
        self._json({"error": {"message": message, "type": code, "code": code, "param": None}}, status, headers)

    def _start_sse(self) -> None:
        self.status = 200
        self.streaming = True
        self.close_connection = True  # the stream ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def _sse(self, data: Any, event: str | None = None) -> None:
        """Send one SSE event; a client that went away cancels the generation instead of raising."""
        if self.gone:
            return
        text = data if isinstance(data, str) else json.dumps(data, default=str)
        frame = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
        try:
            self.wfile.write(frame.encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.gone = True
            self.cancel.set()

    @contextlib.contextmanager
    def _generation(self, bases: list[str]):
        """Wait for the bases in the queue, watching for the client leaving meanwhile and during the work."""
        with watch_disconnect(self.connection, self.cancel), self.agent.gate.enter(bases, self.cancel):
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.agent.observe(time.perf_counter() - t0)
        if self.cancel.is_set() and not self.completed:
            self.agent.metrics.bump("cancelled")
        self.cancel.clear()  # counted once; the request ends normally from here

    # -- OpenAI -------------------------------------------------------------------------------------------------

    def v1_models(self) -> None:
        rt = self.agent.device.rt
        data = [{"id": "moe", "object": "model", "created": int(self.agent.metrics.started), "owned_by": "hublab",
                 "hublab": {"type": "moe", "experts": sorted(rt.experts)}}]
        for name, cfg in sorted(rt.models.items()):
            try:
                created = int(cfg.source.stat().st_mtime)
            except OSError:
                created = 0
            data.append({"id": name, "object": "model", "created": created, "owned_by": "hublab",
                         "hublab": {"type": cfg.type, "base": cfg.base or None, "domain": cfg.domain,
                                    "loaded": rt.is_loaded(name)}})
        self._json({"object": "list", "data": data})

    def v1_chat(self) -> None:
        self._completion(chat=True)

    def v1_completions(self) -> None:
        self._completion(chat=False)

    def _completion(self, chat: bool) -> None:
        body = self._body()
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required: an expert name from /v1/models, or moe")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
            prompt: Any = [{"role": m["role"], "content": _text_of(m.get("content"))} for m in messages]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt must be a string (one prompt per request)")
        opts = _sampler(body)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        device = self.agent.device
        if model == "moe":
            if chat:
                users = [m["content"] for m in prompt if m["role"] == "user"]
                if not users:
                    raise ApiError(400, "model moe needs a user message to route")
                query = users[-1]
            else:
                query = prompt
            extra = body.get("hublab") or {}
            routing, synthesis = extra.get("routing"), extra.get("synthesis")
            bases = device.ask_bases(query, routing, synthesis)
        else:
            bases = [device.base_of(model)]  # unknown model -> 404 with a hint
        chunk_base = {"id": ident, "object": kind + (".chunk" if chat else ""), "created": _now(), "model": model}

        def chunk(piece: str | None, finish: str | None = None) -> dict:
            if chat:
                delta = {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return {**chunk_base, "choices": [choice]}

        with self._generation(bases):
            if stream:
                self._start_sse()
                if chat:
                    first = chunk(None)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    self._sse(first)
            if model == "moe":
                def on_event(kind_: str, data: dict) -> None:
                    if stream and kind_ == "answer_token" and data.get("text"):
                        self._sse(chunk(data["text"]))
                result = device.ask(query, routing=routing, synthesis=synthesis, on_event=on_event,
                                    cancel=self.cancel, max_tokens=opts.get("max_tokens"))
                text = result["answer"]
                stats = [a["stats"] for a in result["answers"] if a.get("stats")]
                usage = (sum(s["prompt_tokens"] for s in stats), sum(s["tokens"] for s in stats))
                finish = "length" if any(s["finish_reason"] == "length" for s in stats) else "stop"
                extension = {"routing": result["routing"], "synthesis": result["synthesis"],
                             "selected": result["selected"], "chosen": result["chosen"]}
            else:
                gen = device.rt.stream(model, prompt, raw=not chat, cancel=self.cancel, **opts)
                for piece in gen:
                    if stream:
                        self._sse(chunk(piece))
                r = gen.result
                text, usage, finish = r.text, (r.prompt_tokens, r.tokens), r.finish_reason
                extension = {"ttft_s": r.ttft_s, "tokens_per_s": r.tokens_per_s}
            if self.gone or self.cancel.is_set():
                return
            usage_doc = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": usage[0] + usage[1]}
            finish = "length" if finish == "length" else "stop"
            if stream:
                self._sse(chunk(None, finish))
                if include_usage:
                    self._sse({**chunk_base, "choices": [], "usage": usage_doc})
                self._sse("[DONE]")
                self.completed = not self.gone
                return
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                          "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            self._json({"id": ident, "object": kind, "created": chunk_base["created"], "model": model,
                        "choices": [choice], "usage": usage_doc, "hublab": extension})

    # -- hublab API -----------------------------------------------------------------------------------------------

    def _name(self, body: dict) -> str:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "name is required: a model or expert name from /api/experts")
        return name

    def api_experts(self) -> None:
        self._json(self.agent.device.list())

    def api_load(self) -> None:
        self._json(self.agent.device.load(self._name(self._body())))

    def api_unload(self) -> None:
        device = self.agent.device
        name = self._name(self._body())
        with self._generation([device.base_of(name)]):  # after the base's running generation, not during it
            self._json(device.unload(name))

    def api_route(self) -> None:
        body = self._body()
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ApiError(400, "query is required: the question to route")
        self._json(self.agent.device.route(query, body.get("routing")))

    def api_ask(self) -> None:
        body = self._body()
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ApiError(400, "query is required: the question to answer")
        routing, synthesis = body.get("routing"), body.get("synthesis")
        max_tokens = _sampler({"max_tokens": body.get("max_tokens")}).get("max_tokens")
        device = self.agent.device
        bases = device.ask_bases(query, routing, synthesis)
        stream = body.get("stream", True)
        with self._generation(bases):
            if stream:
                self._start_sse()
            result = device.ask(query, routing=routing, synthesis=synthesis, cancel=self.cancel,
                                max_tokens=max_tokens, on_event=(lambda k, d: self._sse(d, event=k)) if stream else None)
            if not stream and not self.cancel.is_set():
                self._json(result)
            elif stream:
                self.completed = not self.gone and result["finish_reason"] != "cancelled"

    def api_settings(self) -> None:
        if self.command == "GET":
            self._json(self.agent.device.settings())
            return
        body = self._body()
        self._json(self.agent.device.settings(routing=body.get("routing"), synthesis=body.get("synthesis")))

    def api_info(self) -> None:
        name = (self.query.get("name") or [None])[0]
        self._json(self.agent.device.info(name))

    def api_stats(self) -> None:
        self._json(self.agent.device.stats() | {"queue": {"waiting": self.agent.gate.waiting,
                                                          "running": self.agent.gate.running,
                                                          "capacity": self.agent.gate.size}})

    def api_config(self) -> None:
        body = self._body()
        key = body.get("key")
        if not isinstance(key, str) or not key or "value" not in body:
            raise ApiError(400, "key and value are required, e.g. {\"key\": \"keep_alive\", \"value\": \"10m\"}")
        self._json(self.agent.device.config(key, body["value"], body.get("name")))

    def api_benchmark(self) -> None:
        body = self._body()
        device = self.agent.device
        name = device.benchmark_target(body.get("name"))
        max_tokens = _sampler({"max_tokens": body.get("max_tokens")}).get("max_tokens") or 64
        with self._generation([device.base_of(name)]):
            self._json(device.benchmark(name, max_tokens=max_tokens, cancel=self.cancel))

    def health(self) -> None:
        self._json(self.agent.device.health() | {"queue": self.agent.gate.waiting})

    def metrics(self) -> None:
        self._send(200, self.agent.metrics.render(self.agent).encode(), "text/plain; version=0.0.4; charset=utf-8")


ROUTES: dict[str, dict[str, Callable[[Handler], None]]] = {
    "/health": {"GET": Handler.health},
    "/metrics": {"GET": Handler.metrics},
    "/v1/models": {"GET": Handler.v1_models},
    "/v1/chat/completions": {"POST": Handler.v1_chat},
    "/v1/completions": {"POST": Handler.v1_completions},
    "/api/experts": {"GET": Handler.api_experts},
    "/api/load": {"POST": Handler.api_load},
    "/api/unload": {"POST": Handler.api_unload},
    "/api/route": {"POST": Handler.api_route},
    "/api/ask": {"POST": Handler.api_ask},
    "/api/settings": {"GET": Handler.api_settings, "POST": Handler.api_settings},
    "/api/info": {"GET": Handler.api_info},
    "/api/stats": {"GET": Handler.api_stats},
    "/api/config": {"POST": Handler.api_config},
    "/api/benchmark": {"POST": Handler.api_benchmark},
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class Agent:
    """The HTTP server over one Device. `start()` runs it in a thread (tests, bench); `serve_forever()` blocks."""

    def __init__(self, device: Device, host: str = "127.0.0.1", port: int = 8780, token: str = "",
                 queue_size: int = 8, quiet: bool = False):
        if not is_loopback(host) and not token:
            where = device.rt.system.path or "system.toml"
            raise HublabError(f"refusing to listen on {host} without a token; set [agent] token in {where} "
                              "or HUBLAB_TOKEN (or bind 127.0.0.1)")
        if queue_size < 1:
            raise HublabError(f"queue_size must be at least 1, got {queue_size}; fix [agent] queue_size")
        self.device, self.token, self.quiet = device, token, quiet
        self.gate = Gate(queue_size)
        self.metrics = Metrics()
        self._durations: list[float] = []
        handler = type("BoundHandler", (Handler,), {"agent": self})
        server_cls = _Server
        if ":" in host:
            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            self.server = server_cls((host, port), handler)
        except OSError as exc:
            raise HublabError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); stop what uses the port "
                              "or pass --port") from None
        self.host, self.port = host, self.server.server_address[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def observe(self, seconds: float) -> None:
        self._durations = (self._durations + [seconds])[-20:]

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the recent mean generation time times the queue ahead."""
        recent = self._durations or [1.0]
        return max(1, min(60, round(sum(recent) / len(recent) * (self.gate.waiting + 1))))

    def _expire_loop(self) -> None:
        while not self._stop.wait(self._expire_interval()):
            try:
                self.device.rt.expire_idle()
            except HublabError as exc:
                sys.stderr.write(f"hublab agent: expire: {exc}\n")

    def _expire_interval(self) -> float:
        keep = self.device.rt.keep_alive
        return 5.0 if keep <= 0 else min(30.0, max(0.5, keep / 4))

    def start(self) -> "Agent":
        for target in (self.server.serve_forever, self._expire_loop):
            t = threading.Thread(target=target, name=f"hublab-agent-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def serve_forever(self) -> None:
        self.start()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> "Agent":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser) -> None:
    parser.add_argument("--host", help="address to listen on (default: [agent] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default: [agent] port, 8780; 0 = any free port)")
    parser.add_argument("--queue-size", type=int, help="generation requests that may wait before 503 "
                                                      "(default: [agent] queue_size)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request to stderr")


def cli(args) -> int:
    device = Device.open(profile=getattr(args, "profile", None))
    system = device.rt.system
    token = os.environ.get("HUBLAB_TOKEN") or system.token
    agent = Agent(device, host=args.host or system.host, port=system.port if args.port is None else args.port,
                  token=token, queue_size=args.queue_size or system.queue_size, quiet=args.quiet)

    def stop(signum, frame):
        agent._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"hublab agent {__version__} on {agent.url} (profile {device.rt.profile.name}, "
          f"{len(device.rt.experts)} experts, queue {agent.gate.size}"
          f"{', token required' if token else ''})", flush=True)
    try:
        agent.serve_forever()
    finally:
        agent.stop()
        device.close()
    return 0
