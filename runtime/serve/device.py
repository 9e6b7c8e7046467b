"""The device API in-process: what a hublab device offers, over one `Runtime` and its `Ensemble`.

The `hublab>` shell calls a `Device` directly; the agent (runtime/serve/agent.py) serves the same methods over
HTTP, and `hublab shell --remote URL` talks to that agent through `shell/client.py`, so the commands
are written once. Everything here returns plain data (dicts and dataclasses) and raises `HublabError`s
whose message is one line; `UnknownModel` is the one the HTTP layer answers with 404.

`complete` is the one answer path the OpenAI and Ollama endpoints share: an expert, or `moe` (routed,
synthesised), streamed piece by piece through a callback.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from hublab import __version__

from ..config import (EMBEDDED_MODELS_DIR, MODEL_SCHEMA, SYSTEM_SCHEMA, Key, load_model, load_system, set_system_value,
                     set_toml_key)
from ..errors import HublabError
from ..inputs import has_surrogates, quote
from ..routing.context import ExpertContext

MOE = "moe"        # the model name that routes a query to the experts and synthesises their answers
ROUTER = "router"  # the model name of the router's sentence encoder (embeddings only)
BENCH_PROMPT = "Explain in a few sentences how a Raspberry Pi starts up after power is applied."
# `ai config KEY VALUE`: a bare key names its system.toml section (keys are unique across sections);
# `ai config NAME KEY VALUE` sets a sampler key of one model's TOML.
SYSTEM_KEYS = {key: section for section, keys in SYSTEM_SCHEMA.items() if section != "trust" for key in keys}
INFERENCE_KEYS = MODEL_SCHEMA["inference"]


class UnknownModel(HublabError):
    """No model or expert of that name; the message names the closest one or lists them."""


@dataclass
class Completion:
    """One answer of an expert or the Ensemble, with what the OpenAI and Ollama APIs report about it."""
    model: str
    text: str = ""
    prompt_tokens: int = 0
    tokens: int = 0
    finish_reason: str = "stop"     # stop | length | cancelled
    load_s: float = 0.0
    prompt_s: float = 0.0           # time to the first token
    seconds: float = 0.0            # the whole answer, load included
    cached_tokens: int = 0          # prompt tokens read from the expert's prefix cache
    hublab: dict = field(default_factory=dict)  # moe: routing, selection, chosen; expert: speed


def _applies(spec: Key, loaded: bool) -> str:
    """When an `ai config` change takes effect: the Key's word, but "next load" is "now" while nothing is loaded."""
    return "now" if spec.applies == "next load" and not loaded else spec.applies


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
    raise HublabError(f"{key}: {quote(value)} is not {_kind(types)} ({spec.help}); give a value like "
                      f"{_example(types)}")


def _kind(types: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _example(types: tuple) -> str:
    return {int: "512", float: "0.7", bool: "true", list: "a,b", str: "text"}.get(types[0], "1")


def _package_of(source: Path, models_dir: Path) -> Path | None:
    """The installed package directory holding `source`, if any (its files are hashed by pkg verify)."""
    for parent in source.parents:
        if (parent / "package.toml").is_file():
            return parent
        if parent == models_dir or parent == parent.parent:
            return None
    return None


class MoeStream:
    """The pieces of a streamed `moe` answer, sent as they are produced. summarize and weighted stream what
    the synthesis writes. best and voting stream the leading expert's words as it writes them (one expert
    selected: that is the answer); when another expert's answer wins once every answer is in, it follows
    under a line that says so. concatenate streams each expert under its header as it answers. A constrained
    answer (a JSON document or a tool call) is sent once it is chosen, whole, never two joined."""

    def __init__(self, on_piece: Callable[[str], None] | None, synthesis: str, constrained: bool = False):
        self.on_piece = on_piece
        self.synthesis = synthesis
        self.lead: str | None = None     # the expert whose words are streamed (best, voting)
        self.experts = 0                 # experts started (concatenate)
        self.started = False             # a piece of the current expert's answer was sent (leading space dropped)
        self.held = ""                   # trailing whitespace, sent only once more words follow (answers are trimmed)
        # a constrained answer is one JSON document (or call): only the chosen answer is sent, once it is chosen
        self.live = synthesis in ("best", "voting", "concatenate") and not constrained

    def _send(self, text: str) -> None:
        if self.on_piece is not None and text:
            self.on_piece(text)

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "expert_start" and self.live and data.get("role") != "aggregator":
            self.started, self.held = False, ""
            if self.synthesis == "concatenate":
                self._send(("\n\n" if self.experts else "") + f"### {data['expert']} (score {data['score']:.2f})\n")
                self.experts += 1
            elif self.lead is None:
                self.lead = data["expert"]
        elif kind == "expert_error" and self.live:
            # a remote expert failed (its board went away, its deadline passed): say so in one line; the next
            # expert's words stream from here
            said = self.started or self.synthesis == "concatenate"
            if self.synthesis == "concatenate" or data.get("expert") == self.lead:
                self._send(("\n" if said else "") + f"[{data['expert']} failed: {data.get('error', '')}]\n")
                if data.get("expert") == self.lead:
                    self.lead, self.started, self.held = None, False, ""
        elif kind == "expert_token" and self.live:
            if self.synthesis == "concatenate" or data.get("expert") == self.lead:
                text = data.get("text", "") if self.started else data.get("text", "").lstrip()
                self.started = self.started or bool(text)
                text = self.held + text
                body = text.rstrip()
                self.held = text[len(body):]
                self._send(body)
        elif kind == "answer_token" and not self.live:
            self._send(data.get("text", ""))

    def finish(self, result: dict) -> None:
        """After the synthesis: best or voting chose another expert than the one streamed."""
        chosen = result.get("chosen")
        if self.synthesis in ("best", "voting") and chosen and self.lead and chosen != self.lead \
                and result.get("finish_reason") != "cancelled":
            how = "confidence" if self.synthesis == "best" else "agreement with the others"
            self._send(f"\n\n[{self.synthesis}: {chosen} answered with more {how}]\n{result.get('answer', '')}")


class Device:
    """What a device offers, in-process: the shell uses it directly (as its `Client`, shell/client.py), the
    agent serves it over HTTP."""

    local = True  # the shell's pkg runs here, on the device itself

    def __init__(self, runtime, ensemble=None):
        self.rt = runtime
        self._ensemble = ensemble
        self._ensemble_lock = threading.Lock()
        # the router and knowledge packs every expert answer goes through, shared with the Ensemble
        self.context = ensemble.context if ensemble is not None else ExpertContext(runtime)
        self._bench_runs = 0
        self._keep: dict[str, float] = {}  # base -> keep_alive a request asked for (Ollama's keep_alive)

    @classmethod
    def open(cls, config: str | Path | None = None, profile: str | None = None) -> "Device":
        from ..engine.runtime import Runtime

        return cls(Runtime.from_config(Path(config) if config else None, profile=profile))

    @property
    def ensemble(self):
        """The Ensemble (what the model `moe` runs), made on first use, so a broken [moe] setting does not stop
        `ai list`."""
        with self._ensemble_lock:
            if self._ensemble is None:
                from ..routing.ensemble import Ensemble

                self._ensemble = Ensemble(self.rt, context=self.context)
            return self._ensemble

    def close(self) -> None:
        self.rt.close()

    # -- models -----------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.rt.models)

    def config_of(self, name: str):
        """The ModelConfig of `name`, or UnknownModel saying why: the file that failed to load under that
        name, a missing models dir, or the closest name."""
        if not isinstance(name, str):
            raise HublabError(f"a model name is a string, got {quote(name)}")
        if name not in self.rt.models:
            raise UnknownModel(unknown_model_message(name, list(self.rt.models), self.rt.catalog.errors))
        return self.rt.models[name]

    def list(self) -> dict:
        """Every model and expert (where it runs, and whether that board is up), the peers, the budget."""
        self.rt.refresh_peers()
        return {"models": self.rt.status(), "errors": list(self.rt.catalog.errors),
                "profile": self.rt.profile.name, "budget": self.rt.budget, "used": self.rt.used_memory(),
                "peers": self.rt.peers.status()}

    def routing(self) -> dict:
        """What a front board routes this board's experts by (GET /hublab/routing): each expert of this board with
        its description, domain, keywords, threshold and examples: its own `[expert] examples`, else a sample of
        the router's labelled queries of its domain. Experts of this board's own peers are not passed on."""
        from ..engine.peers import MAX_EXAMPLES
        from ..routing.router import label_texts

        labelled = label_texts(self.router_dir())
        rows = []
        for name, cfg in sorted(self.rt.experts.items()):
            if cfg.peer:
                continue
            examples = list(cfg.examples) or labelled.get(cfg.domain or name, [])
            if len(examples) > MAX_EXAMPLES:  # spread over the whole list, not its first lines
                examples = [examples[i * len(examples) // MAX_EXAMPLES] for i in range(MAX_EXAMPLES)]
            rows.append({"name": name, "description": cfg.description, "domain": cfg.domain or name,
                         "keywords": list(cfg.keywords), "threshold": cfg.threshold, "examples": examples})
        return {"experts": rows, "profile": self.rt.profile.name, "version": __version__}

    def base_of(self, name: str) -> str:
        """The base whose llama.cpp context runs `name` (itself for a base or standalone expert)."""
        cfg = self.config_of(name)
        return cfg.base or cfg.name

    def load(self, name: str) -> dict:
        self.config_of(name)
        t0 = time.perf_counter()
        self.rt.load(name)
        return {"name": name, "seconds": round(time.perf_counter() - t0, 3), "loaded": self.rt.loaded(),
                "used": self.rt.used_memory(), "budget": self.rt.budget}

    def unload(self, name: str) -> dict:
        self.config_of(name)
        gone = self.rt.unload(name)
        return {"name": name, "unloaded": gone, "loaded": self.rt.loaded(), "used": self.rt.used_memory()}

    def rescan(self) -> dict:
        """Re-read the models dir (after a package install) and reopen the router on next use."""
        catalog = self.rt.rescan()
        with self._ensemble_lock:
            if self._ensemble is not None:
                routing, synthesis = self._ensemble.routing, self._ensemble.synthesis
                from ..routing.ensemble import Ensemble

                self._ensemble = Ensemble(self.rt, context=self.context)
                self._ensemble.set(routing=routing, synthesis=synthesis)
        return {"models": sorted(catalog.models), "errors": list(catalog.errors)}

    def info(self, name: str | None = None) -> dict:
        """The runtime (no name), or one model: parameters, quantization, context, memory, last tokens/s."""
        import psutil

        rt = self.rt
        mem = {"used": rt.used_memory(), "budget": rt.budget, "rss": psutil.Process().memory_info().rss}
        if not name:
            return {"profile": rt.profile.name, "profile_description": rt.profile.description,
                    "threads": rt.threads, "threads_fixed": rt.fixed_threads,
                    "threads_now": {b.name: b.policy.best() for b in _loaded_bases(rt)},
                    "ubatch": rt.profile.ubatch,
                    "compute_reserved": {b.name: b.compute_reserved for b in _loaded_bases(rt)},
                    "keep_alive": rt.keep_alive, "models_dir": str(rt.system.models_dir),
                    "config": str(rt.system.path) if rt.system.path else None, "loaded": rt.loaded(),
                    "models": len(rt.models), "experts": len(rt.experts), "memory": mem,
                    "weights": rt.weights.to_dict()}
        from ..engine.memory import read_gguf

        cfg = self.config_of(name)
        if cfg.peer:  # nothing of it is here: what routes it, and where it runs
            return {"name": cfg.name, "type": cfg.type, "description": cfg.description, "base": None,
                    "domain": cfg.domain, "keywords": cfg.keywords, "threshold": cfg.threshold,
                    "examples": len(cfg.examples), "source": str(cfg.source), "loaded": False, "memory": mem,
                    **rt.peers.where(cfg)}
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
                "memory": mem, "last_tokens_per_s": stats.last_tokens_per_s if stats else None,
                "split": rt.split(name).to_dict() if owner.rpc else None}

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
            raise HublabError(f"{key}: is set per model (system.toml's [inference] takes "
                              f"{', '.join(SYSTEM_SCHEMA['inference'])}); name the model, e.g. "
                              f"`ai config {some} {key} {quote(value, 40)}`")
        import difflib

        keys = sorted(set(SYSTEM_KEYS) | set(INFERENCE_KEYS))
        close = difflib.get_close_matches(key, keys, n=1) if len(key) <= 64 else []
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(keys)}"
        raise HublabError(f"unknown setting {quote(key)}; {hint}")

    def _config_system(self, section: str, key: str, value: Any) -> dict:
        path = self.rt.system.path
        if path is None:
            raise HublabError("no system.toml path in use; start with --config FILE or set HUBLAB_CONFIG")
        spec = SYSTEM_SCHEMA[section][key]
        value = _coerce(key, value, spec)
        if key == "models_dir" and isinstance(value, str) and value:
            where = Path(os.path.expanduser(value))
            where = where if where.is_absolute() else path.parent / where
            if not where.is_dir():
                raise HublabError(f"models_dir: {quote(str(where))} is not a directory; create it first "
                                  "(nothing was saved)")
        if section == "moe" and key in ("routing", "synthesis"):
            self.ensemble.set(**{key: value})  # validates before anything is written
        set_system_value(path, section, key, value)
        self._apply_system(section, key, load_system(path))
        return {"key": key, "value": value, "section": section, "saved_to": str(path),
                "applies": _applies(spec, bool(self.rt.loaded()))}

    def _apply_system(self, section: str, key: str, system) -> None:
        """Hand the running runtime the setting just saved, as `applies` says (SYSTEM_SCHEMA's Key.applies):
        the one setting, so what the runtime was started with beyond system.toml (--models-dir) stays."""
        rt = self.rt
        rt.system.raw = system.raw  # [registry] url: pkg reads it from the file on every call
        attr = {"router": "router_dir"}.get(key, key)  # SystemConfig names the router directory router_dir
        if section == "inference":
            rt.system.inference = system.inference  # Runtime.sampler reads it for every answer
        elif hasattr(system, attr):
            setattr(rt.system, attr, getattr(system, attr))
        if key == "models_dir":
            rt.system.defaults_dir = system.defaults_dir
            self.rescan()
        elif key == "threads":
            rt.set_threads(system.threads)
        elif key == "max_memory":
            rt.max_memory = system.max_memory
        elif key == "keep_alive":
            rt.keep_alive = system.keep_alive
        elif key == "profile":  # the budget now, contexts and buffers as each base loads
            from ..engine.profiles import active_profile

            rt.profile = active_profile(system.profile)
            rt.set_threads(rt.threads if rt.fixed_threads else 0)  # 0: the new profile's count
        elif key in ("fallback", "router", "keyword_weight"):
            self.rescan()  # the router is opened with these, and the Ensemble takes its fallback when made

    def _config_model(self, name: str, key: str, value: Any) -> dict:
        cfg = self.config_of(name)
        if key not in INFERENCE_KEYS:
            raise HublabError(f"{key}: not a model setting; model settings are {', '.join(INFERENCE_KEYS)} "
                              f"(system settings take no model name: `ai config {key} VALUE`)")
        if cfg.source.is_relative_to(EMBEDDED_MODELS_DIR):
            raise HublabError(f"{cfg.source} is part of the embedded default set, which is read-only; copy it into "
                              f"{self.rt.system.models_dir} (same name: yours is used) to change it")
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
        return {"key": key, "value": value, "model": name, "saved_to": str(cfg.source),
                "applies": _applies(INFERENCE_KEYS[key], (cfg.base or cfg.name) in self.rt.loaded())}

    def settings(self, routing: str | None = None, synthesis: str | None = None, save: bool = True) -> dict:
        """Show routing and synthesis; with values, set them (validated) and save them to system.toml."""
        check_moe_args(routing, synthesis)
        ensemble = self.ensemble
        if routing or synthesis:
            ensemble.set(routing=routing, synthesis=synthesis)
            path = self.rt.system.path
            if save and path is not None:
                for key, value in (("routing", routing), ("synthesis", synthesis)):
                    if value:
                        set_system_value(path, "moe", key, value)
                        setattr(self.rt.system, key, value)
        s = self.rt.system
        return {"routing": ensemble.routing, "synthesis": ensemble.synthesis, "fallback": ensemble.fallback,
                "keyword_weight": s.keyword_weight, "aggregator": s.aggregator or ensemble.fallback,
                "router": "onnx" if ensemble.router is not None else "keywords",
                "config": str(s.path) if s.path else None}

    # -- answers --------------------------------------------------------------------------------------------

    def route(self, query: str, routing: str | None = None) -> dict:
        check_query(query)
        check_moe_args(routing, None)
        decision = self.ensemble.route(query, routing).to_dict()
        experts = self.rt.experts
        decision["where"] = {s["expert"]: self.rt.peers.where(experts[s["expert"]])
                             for s in decision["scores"] if s["expert"] in experts}
        return decision

    def ask_bases(self, query: str, routing: str | None = None, synthesis: str | None = None) -> list[str]:
        """Bases an `ask` will generate on: its selected experts', and the aggregator's for summarize."""
        check_query(query)
        check_moe_args(routing, synthesis)
        names = list(self.ensemble.route(query, routing).names)
        if (synthesis or self.ensemble.synthesis) == "summarize":
            names.append(self.rt.system.aggregator or self.ensemble.fallback)
        return sorted({self.base_of(n) for n in names if n in self.rt.models})

    def ask(self, query: str, routing: str | None = None, synthesis: str | None = None,
            on_event: Callable[[str, dict], None] | None = None, cancel: threading.Event | None = None,
            max_tokens: int | None = None, format: Any = None, temperature: float | None = None, constraint=None,
            prompt: str | list[dict] | None = None, **sampler: Any) -> dict:
        """Route `query`, run the selected experts on `prompt` (default: the query) and synthesise. `constraint`
        (runtime/engine/structured.py), or `format` ("json" or a JSON schema, as Ollama's), holds every expert's answer
        to it; synthesis picks among valid ones."""
        check_query(query)
        check_moe_args(routing, synthesis)
        if constraint is None and format is not None:
            from ..engine.structured import from_format

            constraint = from_format(format)
        return self.ensemble.ask(query, routing=routing, synthesis=synthesis, on_event=on_event, cancel=cancel,
                            max_tokens=max_tokens, temperature=temperature, constraint=constraint, prompt=prompt,
                            **sampler).to_dict()

    def bases_for(self, model: str, prompt: str | list[dict], routing: str | None = None,
                  synthesis: str | None = None) -> list[str]:
        """The bases an answer of `model` (an expert or moe) generates on: what it queues for."""
        if model == MOE:
            return self.ask_bases(moe_query(prompt), routing, synthesis)
        return [self.base_of(model)]

    def complete(self, model: str, prompt: str | list[dict], *, raw: bool = False, system: str | None = None,
                 on_piece: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                 routing: str | None = None, synthesis: str | None = None, num_ctx: int | None = None,
                 special: bool = True, constraint=None, token_prob: bool = False, **sampler: Any) -> Completion:
        """An answer from expert `model`, or from the Ensemble for "moe": `prompt` is a user message or a list of
        chat messages (the Ensemble routes the last user message), or raw text to continue with raw=True. Pieces
        go to `on_piece` as they come. `sampler` takes Runtime.stream's keywords (max_tokens, temperature,
        top_p, top_k, min_p, repeat_penalty, seed, stop); `num_ctx` caps prompt + answer in tokens; special=False
        tokenizes special tokens in a raw prompt as plain text. `constraint` (runtime/engine/structured.py) holds the
        answer to a JSON schema, a grammar or a tool call; its tools are described to the model in the prompt.
        `token_prob`: report the sampled tokens' mean probability (hublab["mean_token_prob"]; a front's best
        synthesis weighs this board's answer by it). An expert on a peer is answered there (engine/peers.py)."""
        t0 = time.perf_counter()
        if constraint is not None and constraint.tools and not raw:
            from ..chat import with_tools

            prompt = with_tools(prompt, [t.to_dict() for t in constraint.tools])
        grammar = constraint.grammar if constraint is not None else None
        if model == MOE:
            relay = MoeStream(on_piece, synthesis or self.ensemble.synthesis, constrained=constraint is not None)
            r = self.ask(moe_query(prompt), routing=routing, synthesis=synthesis, on_event=relay, cancel=cancel,
                         constraint=constraint, prompt=prompt if constraint is not None and constraint.tools else None,
                         **sampler)
            relay.finish(r)
            stats = [a["stats"] for a in r["answers"] if a.get("stats")]
            return Completion(
                model=model, text=r["answer"], prompt_tokens=sum(s["prompt_tokens"] for s in stats),
                tokens=sum(s["tokens"] for s in stats),
                finish_reason="cancelled" if r["finish_reason"] == "cancelled" else
                "length" if any(s["finish_reason"] == "length" for s in stats) else "stop",
                prompt_s=r["timings"].get("route_s", 0.0), seconds=time.perf_counter() - t0,
                hublab={"routing": r["routing"], "synthesis": r["synthesis"], "selected": r["selected"],
                        "chosen": r["chosen"], **({"note": r["note"]} if r.get("note") else {})})
        cfg = self.config_of(model)
        if cfg.peer and num_ctx is not None:
            raise HublabError(f"num_ctx: {model} runs on peer {cfg.peer}, whose context is set there; leave "
                              "num_ctx out")
        # a local expert's base is loaded (timed) and kept for the answer (llama.cpp re-enters); a remote one's board
        # answers, its pieces coming as it sends them
        with contextlib.nullcontext() if cfg.peer else self.rt.hold(model) as base:
            load_s = 0.0 if cfg.peer else time.perf_counter() - t0
            if num_ctx is not None:
                if num_ctx > base.n_ctx:
                    raise HublabError(f"num_ctx {num_ctx} is over {model}'s context of {base.n_ctx} tokens; lower it "
                                      "or "
                                      f"raise context_size in {cfg.source} (ai config {model} context_size {num_ctx})")
                system_prompt = cfg.inference.system_prompt if system is None else system
                n = len(self.rt.prompt_tokens(base, cfg, prompt, raw, system_prompt, special)[0])
                if n >= num_ctx:
                    raise HublabError(f"prompt is {n} tokens, num_ctx {num_ctx} leaves no room for an answer; "
                                      "raise num_ctx or shorten the prompt")
                sampler["max_tokens"] = min(sampler.get("max_tokens") or num_ctx, num_ctx - n)
            gen = self.context.stream(model, prompt, raw=raw, cancel=cancel, system_prompt=system, special=special,
                                      grammar=grammar, logprobs=token_prob, **sampler)
            for piece in gen:
                if on_piece is not None:
                    on_piece(piece)
        r = gen.result
        where = {"peer": cfg.peer} if cfg.peer else {"threads": r.threads}
        return Completion(model=model, text=r.text, prompt_tokens=r.prompt_tokens, tokens=r.tokens,
                          finish_reason=r.finish_reason, load_s=load_s, prompt_s=r.ttft_s,
                          seconds=time.perf_counter() - t0, cached_tokens=r.cached_tokens,
                          hublab={"ttft_s": r.ttft_s, "tokens_per_s": r.tokens_per_s, **where,
                                  **({"mean_token_prob": r.mean_token_prob} if token_prob else {})})

    # -- keep-alive per request (Ollama's keep_alive) -------------------------------------------------------

    def keep(self, bases: list[str], seconds: float | None) -> list[str]:
        """After an answer: how long its bases stay loaded (None = [runtime] keep_alive, 0 = unload now,
        negative = until unloaded). Returns what was unloaded. Call it while the bases are not generating."""
        gone: list[str] = []
        for base in bases:
            if seconds is None:
                self._keep.pop(base, None)
            elif seconds == 0:
                self._keep.pop(base, None)
                if base in self.rt.models:
                    gone += self.rt.unload(base)
            else:
                self._keep[base] = seconds
        return gone

    def keep_alive_of(self, base: str) -> float:
        return self._keep.get(base, self.rt.keep_alive)

    def expire_idle(self) -> list[str]:
        """Unload bases idle longer than their keep-alive (the request's, else [runtime] keep_alive)."""
        now = time.monotonic()
        gone: list[str] = []
        with self.rt._lock:  # as engine's own expiry: nothing loads or starts on a base meanwhile
            for base in list(_loaded_bases(self.rt)):
                keep = self.keep_alive_of(base.name)
                if keep >= 0 and not base.busy and now - base.last_used >= keep:
                    gone += self.rt.unload(base.name)
                    self._keep.pop(base.name, None)
        return gone

    def running(self) -> list[dict]:
        """What is loaded now: each base and adapter expert, its memory and when it expires (epoch seconds,
        None = never)."""
        rows = []
        now_wall, now = time.time(), time.monotonic()
        for base in _loaded_bases(self.rt):
            keep = self.keep_alive_of(base.name)
            expires = None if keep < 0 else now_wall + max(0.0, base.last_used + keep - now)
            rows.append({"name": base.name, "base": None, "memory": base.estimate.total, "context": base.n_ctx,
                         "expires": expires})
            rows += [{"name": name, "base": base.name, "memory": size, "context": base.n_ctx, "expires": expires}
                     for name, (_, _, size) in base.adapters.items()]
        return rows

    # -- embeddings -----------------------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Sentence embeddings of `texts` from the router's encoder (L2-normalised) and the tokens read."""
        router = self.ensemble.router
        if router is None:
            raise HublabError(f"no router at {self.router_dir()}: embeddings come from the router's encoder; "
                              "install a router package or set [moe] router")
        vectors = router.embed(texts)
        tokens = sum(len(router.tokenizer.encode(t).ids) for t in texts)
        return [[float(x) for x in row] for row in vectors], tokens

    def router_dir(self) -> Path:
        """Where the router is read from: [moe] router, else <models_dir>/router."""
        from ..routing.router import default_router_dir

        return default_router_dir(self.rt.system)

    # -- packages ---------------------------------------------------------------------------------------------

    def check_package(self, ref: str) -> dict:
        """Every check `pull` makes before downloading (signature, schema, hublab version, board fit):
        the variant it would install, or the first failure as a HublabError. Nothing is written."""
        from .. import pkg

        return pkg.check(ref, config=self.rt.system.path, profile=self.rt.profile).to_dict()

    def pull(self, ref: str, progress: Callable[[str, int, int], None] | None = None) -> dict:
        """Install package NAME[:TAG] from the configured registry (signature, schema and board-fit checks
        as `hublab pkg install`), then rescan; `progress(label, done, total)` follows the downloads."""
        from .. import pkg

        system = self.rt.system
        result = pkg.install(ref, config=system.path, models_dir=system.models_dir, profile=self.rt.profile,
                             progress=progress)
        self.rescan()
        return result.to_dict()

    def _package(self, name: str):
        """The installed package `name`, or the one that provides model `name`; None when neither."""
        from .. import pkg

        system = self.rt.system
        packages = pkg.list_packages(config=system.path, models_dir=system.models_dir)
        return next((p for p in packages if p.name == name), None) or next(
            (p for p in packages if name in p.experts or name in p.models), None)

    def package_models(self, name: str) -> list[str]:
        """The models and experts of package `name` (see `_package`) that the runtime knows."""
        rec = self._package(name)
        return [m for m in rec.experts + rec.models if m in self.rt.models] if rec else []

    def delete(self, name: str) -> dict:
        """Remove the installed package `name`, or the package that provides model `name`."""
        from .. import pkg

        system = self.rt.system
        rec = self._package(name)
        if rec is None:
            if name in self.rt.models:
                raise HublabError(f"{name} is defined by {self.rt.models[name].source}, not by an installed package; "
                                  "delete or move that TOML instead")
            installed = pkg.list_packages(config=system.path, models_dir=system.models_dir)
            raise UnknownModel(f"no installed package or packaged model named {name!r}; "
                               f"installed: {', '.join(p.name for p in installed) or 'none'}")
        for model in rec.experts + rec.models:  # nothing keeps running on files about to vanish
            if model in self.rt.models:
                self.rt.unload(model)
        removed = pkg.remove(rec.name, config=system.path, models_dir=system.models_dir)
        self.rescan()
        return removed

    def benchmark_target(self, name: str | None = None) -> str:
        if name:
            self.config_of(name)
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
        r = self.context.generate(name, prompt, max_tokens=max_tokens, cancel=cancel, temperature=0.0)
        return {"name": name, "load_s": None if was_loaded else round(load_s, 3), "prompt_tokens": r.prompt_tokens,
                "prompt_tokens_per_s": round(r.prompt_tokens / r.ttft_s, 1) if r.ttft_s else None,
                "tokens": r.tokens, "tokens_per_s": r.tokens_per_s, "ttft_s": r.ttft_s, "seconds": r.seconds,
                "finish_reason": r.finish_reason, "rss": r.rss_bytes, "threads": r.threads,
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


def unknown_model_message(name: str, known: list[str], errors: list[str]) -> str:
    """Why `name` is not a model: the load error of a file by that name, a missing models dir, or a hint."""
    import difflib

    shown = quote(name)
    for error in errors:  # a TOML that failed to load: its file is <name>.toml, or it names the model
        head = error.split(":", 1)[0]
        if Path(head).stem == name or f"'{name}'" in error or f'"{name}"' in error:
            return f"no model or expert named {shown}: {error}"
    missing = next((e for e in errors if "models directory not found" in e), None)
    if missing:
        return f"no model or expert named {shown}: {missing}"
    close = difflib.get_close_matches(name, known, n=1) if len(name) <= 256 else []
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(known)) or 'none'}"
    if errors:
        hint += f" ({len(errors)} model file{'s' if len(errors) > 1 else ''} failed to load; see ai list)"
    return f"no model or expert named {shown}; {hint}"


def check_query(query: Any) -> None:
    """A question for the router: non-blank text (a blank one is refused as `?` with nothing after it)."""
    if not isinstance(query, str):
        raise HublabError(f"a question is text, got {quote(query)}")
    if not query.strip():
        raise HublabError("empty question; type one after ?, e.g. ?what is a list comprehension")
    if has_surrogates(query):
        raise HublabError("the question is not valid UTF-8 text; send or type it as UTF-8")


def check_moe_args(routing: Any, synthesis: Any) -> None:
    """routing and synthesis for one question (None = the configured one), checked before the Ensemble sees
    them, so a list, a number or a 10 MB string is a one-line error that quotes a few characters."""
    from ..config import parse_routing

    if routing not in (None, ""):  # empty: the configured one, as the Ensemble reads it
        try:
            parse_routing(routing)
        except ValueError as exc:
            raise HublabError(f"routing: {exc}") from None
    if synthesis not in (None, ""):
        choices = SYSTEM_SCHEMA["moe"]["synthesis"].choices
        if not isinstance(synthesis, str) or synthesis not in choices:
            raise HublabError(f"synthesis: unknown {quote(synthesis)}; use one of {', '.join(choices)}")


def moe_query(prompt: str | list[dict]) -> str:
    """The question the Ensemble routes: the prompt, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") or "" for m in prompt if m.get("role") == "user"]
    if not users:
        raise HublabError("model moe needs a user message to route")
    return users[-1]


def _loaded_bases(rt) -> list:
    """The runtime's loaded bases (LoadedBase: last_used, busy, memory, adapters). engine.Runtime has no
    public view of them yet; keep-alive per request and /api/ps need one."""
    return list(rt._loaded.values())
