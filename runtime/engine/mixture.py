"""Decode-time mixture of experts (synthesis `weighted`): ONE answer whose next-token distribution at every step
is the router-weighted mixture of the experts' distributions, on one shared base."""
from __future__ import annotations

import ctypes
import itertools
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import psutil

from ..config import Inference, ModelConfig
from ..errors import HublabError
from .session import PENALTY_LAST_N, Decoded, Generation, GenerationResult, TextStream, decode_text, end_tokens


if TYPE_CHECKING:
    from .runtime import Runtime


def sample(probs: np.ndarray, opts: Inference, rng: np.random.Generator) -> int:
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


def mixture_stream(rt: Runtime, weights: dict[str, float], prompt: str | list[dict], *, max_tokens: int | None = None,
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
    cfgs = [rt.config(n) for n in names]
    owners = {rt._owner(c).name for c in cfgs}
    if len(owners) != 1:
        raise HublabError(f"weighted synthesis needs experts on one shared base; {', '.join(names)} run on "
                          f"{', '.join(sorted(owners))}; use synthesis best or voting for these")
    total = sum(max(0.0, w) for w in weights.values()) or 1.0
    norm = [max(0.0, weights[n]) / total for n in names]
    lead = rt.sampler(cfgs[0], dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, seed=seed))
    stops = list(stop if stop is not None else lead.stop)
    gen = Generation(iter(()))
    gen._pieces = _mixture(rt, gen, cfgs, norm, prompt, lead, stops, cancel)
    return gen

def _mixture(rt: Runtime, gen: Generation, cfgs: list[ModelConfig], weights: list[float], prompt, opts: Inference,
             stops: list[str], cancel: threading.Event | None) -> Iterator[str]:
    import llama_cpp

    for c in cfgs:
        rt.load(c.name)
    with rt.hold(cfgs[0].name) as base:
        t0 = time.perf_counter()
        llama = base.llama
        prompts = []
        for c in cfgs:
            tokens, template_stops = rt.prompt_tokens(base, c, prompt, False, c.inference.system_prompt)
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
            held = end_tokens(llama) if opts.min_tokens else []

            def sampled() -> Iterator[int]:
                for n in itertools.count():
                    mixed = sum(w * d for w, d in zip(weights, dists))
                    if held and n < opts.min_tokens:  # the lead expert's min_tokens: the answer may not end yet
                        mixed[held] = 0.0
                    token = sample(mixed, opts, rng)
                    yield token
                    # resumed only when decoding goes on: every expert reads the chosen token
                    for i, c in enumerate(cfgs):
                        set_expert(c)
                        histories[i].append(token)
                        dists[i] = decode([token], i, positions[i], histories[i])
                        positions[i] += 1

            out, state = TextStream(stops), Decoded()
            yield from decode_text(sampled(), llama, out, cancel, max_new, t0, state)
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
