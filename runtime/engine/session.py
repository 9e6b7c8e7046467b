"""One loaded base model: its llama.cpp context, the adapters on it, the prefix states saved per expert, and the
decode loop every answer runs (read the prompt, sample, stop at end-of-generation, a stop string or cancel).

The Runtime (runtime/engine/runtime.py) decides what is loaded; a LoadedBase runs what it is given.
"""
from __future__ import annotations

import codecs
import ctypes
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import Inference, ModelConfig
from ..errors import HublabError
from .memory import MemoryEstimate
from .threads import ThreadPolicy


@dataclass
class GenerationResult:
    """What one answer came to: its text and how it went (what the API and the shell report)."""
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
    knowledge: int = 0                    # knowledge-pack pairs and passages put before the question
    sources: list[str] = field(default_factory=list)  # the passages' sources, cited at the end of the text
    cached_tokens: int = 0                # prompt tokens whose KV was reused (this expert's prefix cache)
    threads: int = 0                      # llama.cpp threads at the end of the generation

    def to_dict(self) -> dict:
        return asdict(self)


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

    def sample(self, tokens: list[int], opts: Inference, cancel: threading.Event | None = None,
               grammar: str | None = None, budget: int | None = None,
               bias: dict[int, float] | None = None) -> Iterator[int]:
        """Read the prompt's `tokens`, then sample and read one token at a time, for as long as asked. The
        sampler chain is llama-cpp-python's (a logit bias, then penalties over the last 64 generated tokens and
        DRY when `opts.dry_multiplier` is set, then greedy, or top-k, typical, top-p, min-p, temperature and a
        seeded draw) and lives exactly as long as the loop. `grammar` (GBNF, root rule `root`) constrains every
        token to it (llama.cpp's grammar sampler): see `Constrained`; `budget`, the most tokens the answer may
        take, lets it finish the document in time; `bias`: token -> what is added to its logit
        (`favoured_tokens`). The end tokens are held back for the first `opts.min_tokens` (not under a grammar:
        a document ends where it ends)."""
        import llama_cpp

        ctx = self.llama._ctx.ctx
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        penalties = llama_cpp.llama_sampler_init_penalties(self.llama.n_vocab(), PENALTY_LAST_N,
                                                           opts.repeat_penalty, 0.0, 0.0)
        constrained = None
        try:
            if bias:
                table = (llama_cpp.llama_logit_bias * len(bias))(*bias.items())
                add(llama_cpp.llama_sampler_init_logit_bias(self.llama.n_vocab(), len(bias), table))
            if grammar is None:
                add(penalties)  # the chain owns it from here
                if opts.dry_multiplier > 0:  # a JSON document repeats its keys and brackets by design
                    add(dry_sampler(self.llama, opts, self.n_ctx))
            if opts.temperature <= 0:
                add(llama_cpp.llama_sampler_init_greedy())
            else:
                add(llama_cpp.llama_sampler_init_top_k(opts.top_k))
                add(llama_cpp.llama_sampler_init_typical(1.0, 1))
                add(llama_cpp.llama_sampler_init_top_p(opts.top_p, 1))
                add(llama_cpp.llama_sampler_init_min_p(opts.min_p, 1))
                add(llama_cpp.llama_sampler_init_temp(opts.temperature))
                add(llama_cpp.llama_sampler_init_dist(opts.seed if opts.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED))
            if grammar is not None:
                constrained = Constrained(self.llama, grammar, penalties, chain,
                                          need=1 if opts.temperature <= 0 else opts.top_k or None, budget=budget)
                penalties = None
            if not self.decode(tokens, cancel):
                return  # stopped while reading the prompt
            held = end_tokens(self.llama) if opts.min_tokens and constrained is None else []
            n_vocab = self.llama.n_vocab()
            for n in itertools.count():
                if held and n < opts.min_tokens:  # the answer may not end yet
                    np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))[held] = -np.inf
                if constrained is None:
                    token = llama_cpp.llama_sampler_sample(chain, ctx, -1)
                else:
                    token = constrained.sample()
                yield token
                self.decode([token])
        finally:
            if constrained is not None:
                constrained.free()
            if penalties is not None and grammar is not None:
                llama_cpp.llama_sampler_free(penalties)
            llama_cpp.llama_sampler_free(chain)


def favoured_tokens(llama, texts: list[str], bias: float) -> dict[int, float]:
    """token -> `bias` for every token of `texts` written with 3 or more visible characters: the words of what the
    answer was given to read (a retrieved answer, a passage), not the punctuation and short words every answer
    has. On the quality dev questions no pack pair comes near (bench/quality.py --set dev-clean), +1.5 on the
    closest pair's answer took the `?` answer's hit from 0.524 to 0.638 (similarity 0.607 -> 0.609); +2 gave 0.619,
    +3 0.571 with 5 % of the answers degenerate; leaving function words (the, and) out gave 0.610."""
    if not bias or not texts:
        return {}
    found: dict[int, float] = {}
    for text in texts:
        for token in llama.tokenize(text.encode(), add_bos=False, special=False):
            if token not in found and len(llama.detokenize([token], special=False).decode("utf-8", "ignore")
                                          .strip()) >= 3:
                found[token] = bias
    return found


def _model_key(llama) -> tuple:
    """What the per-model caches below are kept under: the model file and its vocabulary size."""
    return str(getattr(llama, "model_path", id(llama))), llama.n_vocab()


_DRY: dict[tuple, object] = {}  # (model file, vocabulary size, settings, context) -> a DRY sampler to clone


def dry_sampler(llama, opts: Inference, n_ctx: int):
    """A fresh DRY sampler (llama.cpp's) over the whole context, for one answer's chain to own. Making one scans
    the vocabulary for the tokens holding each sequence breaker (50 ms for gemma's 262k on this x86 core, more on
    a Pi), so the first is kept per model and settings and each answer gets a clone, reset."""
    import llama_cpp

    key = (*_model_key(llama), opts.dry_multiplier, opts.dry_base, opts.dry_allowed_length, n_ctx)
    if key not in _DRY:
        breakers = (ctypes.c_char_p * len(DRY_BREAKERS))(*DRY_BREAKERS)
        _DRY[key] = llama_cpp.llama_sampler_init_dry(llama._model.vocab, opts.dry_multiplier, opts.dry_base,
                                                     opts.dry_allowed_length, n_ctx, breakers, len(DRY_BREAKERS))
    sampler = llama_cpp.llama_sampler_clone(_DRY[key])
    llama_cpp.llama_sampler_reset(sampler)
    return sampler


_ENDS: dict[tuple, list[int]] = {}  # (model file, vocabulary size) -> its end-of-generation tokens


def end_tokens(llama) -> list[int]:
    """The tokens that end generation: llama.cpp's end-of-generation set, the one decode_text stops at (gemma has
    three: end of text, end of turn and one more), read off the vocabulary once per model (about 0.17 s for
    gemma's 262k tokens)."""
    import llama_cpp

    key = _model_key(llama)
    if key not in _ENDS:
        vocab = llama._model.vocab
        _ENDS[key] = [t for t in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    return _ENDS[key]


_CLOSERS: dict[tuple, dict[int, str]] = {}  # (model file, vocabulary size) -> its tokens of closing characters


def closer_tokens(llama) -> dict[int, str]:
    """The model's tokens written only with `"`, `]`, `}` (and spaces around them) -> that text, stripped; read off
    the vocabulary once per model (about 0.7 s for gemma's 262k tokens)."""
    key = _model_key(llama)
    if key not in _CLOSERS:
        found = {}
        for token in range(llama.n_vocab()):
            text = llama.detokenize([token], special=False).decode("utf-8", errors="ignore")
            if text.strip() and set(text) <= set('"]} \n'):
                found[token] = text.strip()
        _CLOSERS[key] = found
    return _CLOSERS[key]


def json_closing(text: str) -> str:
    """What closes the JSON `text` begins: the open string's quote, then a bracket for each open array and object,
    innermost first ("" when nothing is open)."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and stack:
            stack.pop()
    return ('"' if in_string else "") + "".join(reversed(stack))


class GrammarError(HublabError):
    """llama.cpp refused a grammar, or a grammar allows no token where generation has to go on."""


class Constrained:
    """Grammar-constrained sampling at nearly the unconstrained speed (llama.cpp's common sampler does the same).

    Checking a grammar over the whole vocabulary costs about as much as a decode step with gemma's 262k tokens,
    so the token is drawn from the unconstrained chain first and only that one token is checked against the
    grammar (a one-element candidate array through llama_sampler_apply). Only when it is rejected is the draw
    redone with the grammar applied: to the TIERS[0] most likely candidates when at least `need` of them pass
    (top-k of the allowed tokens is then the same set as over the whole vocabulary: every allowed token outside
    them is less likely than each of those), else to the TIERS[1] most likely, else to the whole vocabulary (the
    grammar costs about 0.3 ms per 512 candidates). The token chosen is accepted into the
    penalties, the chain and the grammar alike.

    llama.cpp's grammar reads tokens as code points without checking that their bytes are valid UTF-8: a lone
    byte token can start an overlong or surrogate sequence no JSON parser takes. So the text is also kept valid
    UTF-8 here: a chosen token that would break it is turned down like one the grammar rejects, and the redraw
    masks the byte tokens (and end-of-generation, mid-character) that would.

    A document cut off by max_tokens does not parse: with a `budget`, its last tokens (a quarter, 12 to
    CLOSE_WITHIN) close it
    instead: the allowed token that writes the most of what closes the JSON written so far (the open string's
    quote, then the open arrays' and objects' brackets); the model's own choice where nothing closing is allowed
    (a required key or value still to come) or nothing is open."""

    TIERS = (512, 16384)
    CLOSE_WITHIN = 32

    def __init__(self, llama, grammar: str, penalties, chain, need: int | None, budget: int | None = None):
        import llama_cpp

        from . import llama_log

        self.llama, self.penalties, self.chain, self.need = llama, penalties, chain, need
        with llama_log.capture() as lines:
            self.grammar = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, grammar.encode(), b"root")
        if not self.grammar:
            said = [line.strip() for line in lines if "error" in line.lower() or "recursion" in line]
            said = said or [line.strip() for line in lines if line.strip()] or ["llama.cpp could not parse it"]
            raise GrammarError(f"grammar: {said[0][:300]}")
        n = llama.n_vocab()
        self.n_vocab = n
        self.buf = np.zeros(n, dtype=TOKEN_DATA)
        self.ids = np.arange(n, dtype=np.int32)
        self.cur = llama_cpp.llama_token_data_array(
            self.buf.ctypes.data_as(llama_cpp.llama_token_data_p), n, -1, False)
        self.one = np.zeros(1, dtype=TOKEN_DATA)
        self.cur_one = llama_cpp.llama_token_data_array(
            self.one.ctypes.data_as(llama_cpp.llama_token_data_p), 1, -1, False)
        self.tiers = [(t, llama_cpp.llama_sampler_init_top_k(t)) for t in self.TIERS
                      if need is not None and need <= t < n]
        self.penalized = None  # this step's logits after the penalties, kept for a redraw
        self.rejected = 0  # draws the grammar turned down (each one redone with the grammar applied)
        self.pending = b""  # the bytes of a character not yet complete at the end of the answer
        self.banned: set[int] = set()  # tokens found to break UTF-8 in this answer's redraws
        self.bytes_of = _byte_tokens(llama)  # byte value -> its token id, for the model's byte tokens
        self.vocab = llama._model.vocab
        self.left = budget  # tokens the answer may still take (None: no limit known)
        self.reserve = max(12, min(self.CLOSE_WITHIN, (budget or 0) // 4))  # the tokens kept for closing
        self.closers: dict[int, str] | None = None  # single tokens of closing characters -> their text
        self.text = bytearray()  # the answer so far, for what closing it takes

    def _fill(self) -> None:
        import llama_cpp

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llama._ctx.ctx, -1), shape=(self.n_vocab,))
        self.buf["id"] = self.ids
        self.buf["logit"] = logits
        self.buf["p"] = 0.0
        self.cur.size, self.cur.selected, self.cur.sorted = self.n_vocab, -1, False

    def _refill(self) -> None:
        """The candidates again, from this step's penalized logits (the chain sorted and cut the array)."""
        self.buf["id"] = self.ids
        self.buf["logit"] = self.penalized
        self.buf["p"] = 0.0
        self.cur.size, self.cur.selected, self.cur.sorted = self.n_vocab, -1, False

    def _apply(self, sampler) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self.cur))

    def _allowed(self, token: int) -> bool:
        import llama_cpp

        self.one[0] = (token, 0.0, 0.0)
        self.cur_one.size, self.cur_one.selected, self.cur_one.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self.cur_one))
        return bool(np.isfinite(self.one[0]["logit"]))

    def _chosen(self) -> int:
        return int(self.buf[self.cur.selected]["id"])

    def _keeps_utf8(self, token: int) -> bool:
        """Whether the text stays valid UTF-8 (a whole character at the end, for end-of-generation) with `token`."""
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return not self.pending
        return utf8_prefix(self.pending + self.llama.detokenize([token], special=False)) is not None

    def _mask_utf8(self) -> None:
        """-inf for the candidates whose bytes would break UTF-8: byte tokens that cannot come next, and
        end-of-generation in the middle of a character."""
        bad = [token for value, token in self.bytes_of.items() if utf8_prefix(self.pending + bytes([value])) is None]
        if self.pending:
            bad += end_tokens(self.llama)
        if bad:
            size = self.cur.size
            hit = np.isin(self.buf["id"][:size], np.asarray(bad, dtype=np.int32))
            self.buf["logit"][:size][hit] = -np.inf

    def _closing(self) -> int | None:
        """Near the end of the budget: the allowed token that closes the most of what is open (None: none does)."""
        needed = json_closing(self.text.decode("utf-8", errors="replace"))
        if not needed:
            return None  # nothing open (a finished document, or text): the grammar and the model say what follows
        if self.closers is None:
            self.closers = closer_tokens(self.llama)
        fitting = [(len(text), token) for token, text in self.closers.items() if needed.startswith(text)]
        for _, token in sorted(fitting, reverse=True):
            if self._allowed(token) and self._keeps_utf8(token):
                return token
        return None

    def sample(self) -> int:
        import llama_cpp

        if self.left is not None:
            self.left -= 1
            if self.left < self.reserve:
                token = self._closing()
                if token is not None:
                    for sampler in (self.penalties, self.chain, self.grammar):
                        llama_cpp.llama_sampler_accept(sampler, token)
                    self._took(token)
                    return token
        self._fill()
        self._apply(self.penalties)
        self.penalized = self.buf["logit"].copy()
        self._apply(self.chain)
        token = self._chosen()
        if not self._allowed(token) or not self._keeps_utf8(token):
            self.rejected += 1
            token = self._resample()
        for sampler in (self.penalties, self.chain, self.grammar):
            llama_cpp.llama_sampler_accept(sampler, token)
        self._took(token)
        return token

    def _took(self, token: int) -> None:
        import llama_cpp

        if not llama_cpp.llama_vocab_is_eog(self.vocab, token):
            piece = self.llama.detokenize([token], special=False)
            self.pending = utf8_prefix(self.pending + piece) or b""
            self.text += piece

    def _resample(self) -> int:
        for _ in range(8):  # a token whose own bytes break UTF-8 (a partial BPE piece) is masked and drawn again
            token = self._redraw()
            if self._keeps_utf8(token):
                return token
            self.banned.add(token)
        raise GrammarError("grammar: no token keeps the answer valid UTF-8 here; loosen the grammar")

    def _redraw(self) -> int:
        for size, prefilter in self.tiers:
            self._refill()
            self._apply(prefilter)  # the `size` most likely candidates
            self._apply(self.grammar)
            self._mask()
            if int(np.isfinite(self.buf["logit"][:size]).sum()) >= self.need:
                self._apply(self.chain)
                return self._chosen()
        self._refill()
        self._apply(self.grammar)
        self._mask()
        if not np.isfinite(self.buf["logit"][:self.cur.size]).any():
            raise GrammarError("grammar: no token can continue the answer here (an empty character class, or "
                               "text no token spells?); loosen the grammar")
        self._apply(self.chain)
        return self._chosen()

    def _mask(self) -> None:
        """After the grammar: mask what breaks UTF-8 or was banned. The -inf logits are set in place, so the array
        is no longer sorted whatever its flag said (top-k would otherwise keep the first k, rejected ones too)."""
        self.cur.sorted = False
        self._mask_utf8()
        if self.banned:
            size = self.cur.size
            hit = np.isin(self.buf["id"][:size], np.fromiter(self.banned, dtype=np.int32))
            self.buf["logit"][:size][hit] = -np.inf

    def free(self) -> None:
        import llama_cpp

        for sampler in (self.grammar, self.penalties, *(t for _, t in self.tiers)):
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
        self.grammar = self.penalties = None
        self.tiers = []


# UTF-8 (RFC 3629): the bytes that may follow each lead byte; no overlong forms, surrogates or code points past U+10FFFF
_UTF8 = {**{b: [(0x80, 0xBF)] for b in range(0xC2, 0xE0)}, 0xE0: [(0xA0, 0xBF), (0x80, 0xBF)],
         **{b: [(0x80, 0xBF)] * 2 for b in (*range(0xE1, 0xED), 0xEE, 0xEF)}, 0xED: [(0x80, 0x9F), (0x80, 0xBF)],
         0xF0: [(0x90, 0xBF), (0x80, 0xBF), (0x80, 0xBF)], **{b: [(0x80, 0xBF)] * 3 for b in range(0xF1, 0xF4)},
         0xF4: [(0x80, 0x8F), (0x80, 0xBF), (0x80, 0xBF)]}


def utf8_prefix(data: bytes) -> bytes | None:
    """None when `data` cannot begin valid UTF-8 text; else its incomplete last character (b"" when none)."""
    i = 0
    while i < len(data):
        lead = data[i]
        if lead < 0x80:
            i += 1
            continue
        follow = _UTF8.get(lead)
        if follow is None:
            return None
        for j, (lo, hi) in enumerate(follow, start=1):
            if i + j == len(data):
                return data[i:]
            if not lo <= data[i + j] <= hi:
                return None
        i += len(follow) + 1
    return b""


_BYTE_TOKENS: dict[tuple, dict[int, int]] = {}


def _byte_tokens(llama) -> dict[int, int]:
    """The model's byte tokens (<0x00>..<0xFF> in a SentencePiece vocabulary): byte value -> token id, read once
    per model."""
    import llama_cpp

    key = (ctypes.cast(llama._model.model, ctypes.c_void_p).value, llama.model_path)
    if key not in _BYTE_TOKENS:
        vocab = llama._model.vocab
        found = {}
        for token in range(llama.n_vocab()):
            if llama_cpp.llama_vocab_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_BYTE:
                piece = llama.detokenize([token], special=False)
                if len(piece) == 1:
                    found[piece[0]] = token
        _BYTE_TOKENS[key] = found
    return _BYTE_TOKENS[key]


TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


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


def is_special(llama, token: str) -> bool:
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
DRY_BREAKERS = (b"\n", b":", b'"', b"*")  # llama.cpp's default: a repeated run is matched only within them
PREFILL_STEP = 128  # prompt tokens read between checks for a stop (a stopped answer waits at most this)


class TextStream:
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
class Decoded:
    """What the shared decode loop reports once it ends."""
    n_new: int = 0
    ttft: float = 0.0
    finish: str = "length"


def decode_text(tokens: Iterator[int], llama, out: TextStream, cancel: threading.Event | None, max_new: int,
                 t0: float, state: Decoded, on_token=None) -> Iterator[str]:
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
