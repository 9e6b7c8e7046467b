"""What an expert is shown besides the question: the knowledge-pack pairs closest to it, found with the router's
encoder. It sits above the engine: the engine generates from the chat it is given; this decides the chat.

    ctx = ExpertContext(rt)
    for piece in ctx.stream("python", "What is a list comprehension?"):   # the pack's closest pairs go first
        print(piece, end="")

The router is opened on first use and again after the runtime's catalog changes (an install, a rescan), so it
knows the experts installed now.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

from ..config import ModelConfig
from ..engine.runtime import Generation, GenerationResult, Runtime
from .knowledge import DocPack, Library, citation, find_doc_packs, shots, with_passages
from .router import Router, default_router_dir

CHARS_PER_TOKEN = 3  # for the knowledge budget: gemma's tokenizer gives English prose 3.5-4.5 characters a token


class Found(NamedTuple):
    """What `ExpertContext.lookup` put into a chat."""
    chat: str | list[dict]
    count: int              # pairs and passages put in
    sources: list[str]      # the passages' sources, which the answer cites
    favour: list[str]       # what the sampler favours the words of: the closest pair's answer, every passage


class ExpertContext:
    """The router and the knowledge packs of one Runtime's experts."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.router_note = ""
        self._lock = threading.Lock()
        self._catalog = None    # the catalog the router was opened for
        self._router: Router | None = None
        self._library: Library | None = None
        self._docs: list[DocPack] | None = None  # the knowledge packages under the models dirs

    @property
    def router(self) -> Router | None:
        """The ONNX router, opened on first use; None (keywords only) when the models dir has none."""
        with self._lock:
            if self._catalog is not self.rt.catalog:
                self._router, self._library, self._docs, self.router_note = None, None, None, ""
                directory = default_router_dir(self.rt.system)
                if directory.is_dir():
                    # a broken router raises here on every use, until it is fixed (the catalog stays unmatched)
                    self._router = Router.load(directory, list(self.rt.experts.values()),
                                               keyword_weight=self.rt.system.keyword_weight,
                                               fallback=self.rt.system.fallback, threads=1)
                else:
                    self.router_note = (f"no router at {directory}: routing by keywords only "
                                        "(build one with `hublab train router`)")
                self._catalog = self.rt.catalog
            return self._router

    def doc_packs(self, domain: str | None) -> list[DocPack]:
        """The knowledge packages (`hublab knowledge build`) that serve an expert of this domain."""
        with self._lock:
            if self._docs is None:
                self._docs, errors = find_doc_packs(self.rt.system.model_dirs)
                if errors:  # a broken package is left out and said, the others still serve
                    self.router_note = "; ".join(n for n in (self.router_note, *errors) if n)
            return [d for d in self._docs if d.serves(domain)]

    def lookup(self, cfg: ModelConfig, prompt: str | list[dict], query_embedding=None) -> Found:
        """The chat with the expert's closest knowledge-pack pairs and documentation passages put in (`Found`).
        The pack's pairs go before the question as earlier turns, the passages into the question's own turn, the
        closest last. `query_embedding`: the last user message's, when routing made it already."""
        nothing = Found(prompt, 0, [], [])
        if cfg.peer:  # answered on another board, which puts its own knowledge before the question
            return nothing
        docs = self.doc_packs(cfg.domain)
        if (cfg.knowledge is None or cfg.knowledge_shots <= 0) and not any(d.passages for d in docs):
            return nothing
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
        router = self.router
        if not users or router is None or not router.has_embedding:
            return nothing
        with self._lock:
            if self._library is None:
                self._library = Library(router.embed, router.encoder_id)
            library = self._library
        query = router.embed([users[-1]])[0] if query_embedding is None else query_embedding
        pairs = (library.pack(cfg.knowledge).nearest(query, cfg.knowledge_shots, cfg.knowledge_min)
                 if cfg.knowledge is not None and cfg.knowledge_shots > 0 else [])
        passages = sorted((hit for d in docs for hit in library.pack(d.path).nearest(query, d.passages,
                                                                                      d.min_similarity)),
                          key=lambda hit: -hit[0])[:max((d.passages for d in docs), default=0)]
        pairs, passages = self._within(cfg, pairs, passages)
        if not pairs and not passages:
            return nothing
        if passages:  # into the last question's own turn
            last = max(i for i, m in enumerate(messages)
                       if m.get("role") == "user" and isinstance(m.get("content"), str))
            messages[last] = {**messages[last], "content": with_passages(messages[last]["content"], passages)}
        at = next(i for i, m in enumerate(messages) if m.get("role") != "system")
        chat = messages[:at] + shots(pairs) + messages[at:]
        return Found(chat, len(pairs) + len(passages), [rec["source"] for _, rec in passages],
                     [rec["response"] for _, rec in pairs[:1]] + [rec["passage"] for _, rec in passages])

    def _within(self, cfg: ModelConfig, pairs: list, passages: list) -> tuple[list, list]:
        """The pairs and passages that fit half the expert's context, the closest kept first: the question and the
        answer need the rest (a 512-token Zero context and one long man-page passage would leave no room). Text is
        counted at CHARS_PER_TOKEN, fewer characters than gemma's tokenizer gives English a token, so it errs short."""
        room = self.rt.context_size(cfg) * CHARS_PER_TOKEN // 2
        kept: set[tuple[int, int]] = set()  # (0 pair | 1 passage, its index)
        for score, kind, i, size in sorted([(s, 0, i, len(r["question"]) + len(r["response"]))
                                            for i, (s, r) in enumerate(pairs)]
                                           + [(s, 1, i, len(r["source"]) + len(r["passage"]))
                                              for i, (s, r) in enumerate(passages)], key=lambda x: -x[0]):
            if size <= room:
                room -= size
                kept.add((kind, i))
        return ([hit for i, hit in enumerate(pairs) if (0, i) in kept],
                [hit for i, hit in enumerate(passages) if (1, i) in kept])

    def stream(self, name: str, prompt: str | list[dict], *, raw: bool = False, query_embedding=None,
               **kwargs) -> Generation:
        """Runtime.stream with the expert's knowledge put before a chat (a raw completion is sent as it is).
        An answer given documentation passages ends citing their sources, `[python docs: os.path]`: added here
        from the passages shown, not left to the model (a constrained answer, a JSON document, is left whole)."""
        n, sources, favour = 0, [], []
        if not raw:
            prompt, n, sources, favour = self.lookup(self.rt.config(name), prompt, query_embedding)
        gen = self.rt.stream(name, prompt, raw=raw, knowledge=n, favour=favour, **kwargs)
        return gen if not sources or kwargs.get("grammar") else _cited(gen, sources)

    def generate(self, name: str, prompt: str | list[dict], **kwargs) -> GenerationResult:
        """Like `stream` but returns the finished result."""
        gen = self.stream(name, prompt, **kwargs)
        for _ in gen:
            pass
        return gen.result


def _cited(gen: Generation, sources: list[str]) -> Generation:
    """The generation with the passages' sources streamed after its last piece and kept in its result."""
    out = Generation(iter(()))

    def pieces():
        said = []
        for piece in gen:
            said.append(piece)
            yield piece
        result = gen.result
        tag = citation("".join(said), sources) if result.finish_reason != "cancelled" else ""
        if tag:
            yield tag
            result.text += tag
        result.sources = list(dict.fromkeys(sources))
        out.result = result

    out._pieces = pieces()
    return out
