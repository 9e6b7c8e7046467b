"""The ensemble: route a question to experts and synthesise their answers into one; what the model `moe`, `?question`
and `moe query` run (the trainer's MoE models, experts inside one network, are another thing: trainer/moe.py).
Each strategy does what its name says:

- best: every selected expert answers; confidence = router score x the answer's mean token probability
  (from llama.cpp's logits), and 0 for a degenerate answer (hublab.runtime.routing.quality: a loop is the most
  probable text a small model writes, so probability alone would reward it); the most confident answer wins.
- weighted (WeightedAverage): ONE answer decoded from the router-weighted mixture of the selected experts'
  next-token distributions at every step (Runtime.mixture_stream; experts on one shared base).
- voting: every selected expert answers; the answer with the highest score-weighted mean agreement with
  the others (cosine similarity of the router encoder's embeddings of the answers) wins.
- concatenate: every answer, best score first, each under a header with the expert's name and score.
- summarize: every selected expert answers, then the aggregator ([moe] aggregator, default the fallback
  expert) is prompted with the question and the candidates and writes one answer (Mixture-of-Agents).

Without a router directory, routing is by keywords alone: the scores are the keyword distribution when
any expert's keyword is found, else the fallback expert scores 1 (and the result's note says so).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..config import SYSTEM_SCHEMA, parse_routing
from ..engine.peers import PeerError
from ..engine.runtime import Generation, GenerationResult, Runtime
from ..errors import HublabError
from ..inputs import quote
from .context import ExpertContext
from .quality import degenerate
from .router import Router, RouterError, Selection, blend, select

SYNTHESES = SYSTEM_SCHEMA["moe"]["synthesis"].choices
Event = Callable[[str, dict], None]


@dataclass
class ExpertAnswer:
    expert: str
    score: float
    text: str
    confidence: float | None = None     # best: score x mean token probability
    agreement: float | None = None      # voting: weighted mean cosine similarity with the other answers
    result: GenerationResult | None = None

    def to_dict(self) -> dict:
        return {"expert": self.expert, "score": self.score, "text": self.text, "confidence": self.confidence,
                "agreement": self.agreement, "stats": self.result.to_dict() if self.result else None}


@dataclass
class EnsembleResult:
    query: str
    answer: str
    routing: str
    synthesis: str
    selection: Selection
    answers: list[ExpertAnswer] = field(default_factory=list)
    chosen: str | None = None           # the expert whose answer won (best, voting)
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""
    finish_reason: str = "stop"
    constraint: object = None           # the format every answer keeps to (runtime/engine/structured.py), if any

    @property
    def selected(self) -> list[dict]:
        return [c.to_dict() for c in self.selection.choices]

    def to_dict(self) -> dict:
        return {"query": self.query, "answer": self.answer, "routing": self.routing, "synthesis": self.synthesis,
                "selected": self.selected, "chosen": self.chosen,
                "answers": [a.to_dict() for a in self.answers],
                "scores": [s.to_dict() for s in self.selection.scores], "fallback": self.selection.fallback,
                "timings": {k: round(v, 4) for k, v in self.timings.items()}, "note": self.note,
                "finish_reason": self.finish_reason}


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-12)
    return unit @ unit.T


def vote(scores: list[float], similarity: np.ndarray) -> list[float]:
    """Each answer's score-weighted mean similarity with the other answers."""
    out = []
    for i in range(len(scores)):
        others = [j for j in range(len(scores)) if j != i]
        total = sum(scores[j] for j in others)
        if not others:
            out.append(1.0)
        elif total <= 0:
            out.append(float(np.mean([similarity[i, j] for j in others])))
        else:
            out.append(float(sum(scores[j] * similarity[i, j] for j in others) / total))
    return out


def _valid(answers: list[ExpertAnswer], constraint) -> list[ExpertAnswer]:
    """The answers a constrained question may take: finished and of the asked format (all when none is)."""
    if constraint is None:
        return answers
    ok = [a for a in answers if a.result is not None and a.result.finish_reason == "stop"
          and constraint.valid(a.result.text)]
    return ok or answers


def summarize_prompt(query: str, answers: list[ExpertAnswer]) -> str:
    lines = [f"Question: {query}", "", "Answers from specialist experts:"]
    for i, a in enumerate(answers, 1):
        lines.append(f"[{i}] {a.expert} (router score {a.score:.2f}): {a.text.strip()}")
    lines += ["", "Write one correct, concise answer to the question, combining what the answers get right "
                  "and dropping what they get wrong."]
    return "\n".join(lines)


class _Ahead:
    """A remote expert's answer started before its turn: a thread reads it as its board sends it, and iterating
    gives the pieces kept so far, then the rest as they come (an error is raised where it is read)."""

    def __init__(self, start: Callable[[], Generation]):
        self.gen = None
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(start,), name="hublab-remote-ahead", daemon=True).start()

    def _read(self, start: Callable[[], Generation]) -> None:
        try:
            self.gen = start()
            for piece in self.gen:
                self._queue.put(("piece", piece))
            self._queue.put(("end", None))
        except Exception as exc:  # noqa: BLE001 - a PeerError (or anything else) belongs to whoever reads it
            self._queue.put(("error", exc))

    def __iter__(self):
        while True:
            kind, value = self._queue.get()  # the peer's deadline bounds the wait (engine/peers.py)
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value

    @property
    def result(self):
        return self.gen.result


class Ensemble:
    """Routing + experts + synthesis over one Runtime: what `?question`, `moe query` and model=moe run."""

    def __init__(self, runtime: Runtime, router: Router | None = None, context: ExpertContext | None = None):
        self.rt = runtime
        self.context = context or ExpertContext(runtime)  # the router and the knowledge packs
        self.routing = runtime.system.routing
        self.synthesis = runtime.system.synthesis
        self.fallback = runtime.system.fallback
        self._router = router

    @property
    def router(self) -> Router | None:
        """The router given, else the context's (opened on first use; None = keywords only)."""
        return self._router if self._router is not None else self.context.router

    @property
    def router_note(self) -> str:
        return self.context.router_note

    def set(self, routing: str | None = None, synthesis: str | None = None) -> None:
        """Change the strategy for this session (validated; the shell persists it to system.toml)."""
        if routing is not None:
            try:
                parse_routing(routing)
            except ValueError as exc:
                raise HublabError(f"routing: {exc}") from None
        if synthesis is not None and synthesis not in SYNTHESES:
            raise HublabError(f"synthesis: unknown {quote(synthesis)}; use one of {', '.join(SYNTHESES)}")
        self.routing = routing or self.routing
        self.synthesis = synthesis or self.synthesis

    def route(self, query: str, routing: str | None = None) -> Selection:
        """Every expert's score and the strategy's selection; nothing is generated."""
        experts = self.rt.experts
        if not experts:
            raise HublabError(f"no experts in {self.rt.system.models_dir}; install a package or add expert TOMLs")
        if self.fallback not in experts:
            raise HublabError(f"[moe] fallback: no expert named {self.fallback!r}; set it to one of "
                              f"{', '.join(sorted(experts))}")
        routing = routing or self.routing
        if self.rt.peers:
            self.rt.refresh_peers()  # a peer back, or one with new experts, is routed to from this question on
            experts = self.rt.experts
        try:
            router = self.router
            if router is not None:
                return self._skip_down(router.route(query, routing, self.fallback, self.rt.system.sure))
            model = {name: 1.0 if name == self.fallback else 0.0 for name in experts}
            keywords = {name: cfg.keywords for name, cfg in experts.items()}
            scores = blend(query, model, keywords, 1.0)
            return self._skip_down(select(scores, routing, self.fallback,
                                          {n: c.threshold for n, c in experts.items()}, self.rt.system.sure))
        except RouterError as exc:
            raise HublabError(str(exc)) from None

    def _skip_down(self, selection: Selection) -> Selection:
        """The selection without the remote experts whose peer is down (probed when due): the next-ranked take
        their place, and the note says which were skipped and why. The fallback is never skipped."""
        experts = self.rt.experts
        gone: dict[str, str] = {}
        for _ in range(len(experts)):
            down = self.rt.peers.down([experts[n] for n in selection.names if n in experts and n != self.fallback])
            if not down:
                break
            gone.update(down)
            left = [s for s in selection.scores if s.expert not in gone]
            again = select(left, selection.routing, self.fallback, {n: c.threshold for n, c in experts.items()},
                           self.rt.system.sure)
            selection = replace(again, scores=selection.scores, embedding=selection.embedding)
        if gone:
            said = "; ".join(f"skipped {name} ({why})" for name, why in gone.items())
            selection = replace(selection, note="; ".join(n for n in (said, selection.note) if n))
        return selection

    def ask(self, query: str, routing: str | None = None, synthesis: str | None = None,
            on_event: Event | None = None, cancel: threading.Event | None = None,
            max_tokens: int | None = None, temperature: float | None = None, constraint=None,
            prompt: str | list[dict] | None = None, **sampler) -> EnsembleResult:
        """Route, run the selected experts, synthesise one answer. `on_event(kind, data)` reports progress.
        `prompt` is what the experts answer (default: the query); `sampler` takes Runtime.stream's other sampler
        keywords (top_p, top_k, min_p, repeat_penalty, seed, stop). With `constraint` (runtime/engine/structured.py)
        every expert answers to its grammar and synthesis picks among the valid answers: concatenate and weighted,
        which would join or blend documents, pick as best does (the note says so)."""
        emit = on_event or (lambda kind, data: None)
        synthesis = synthesis or self.synthesis
        if synthesis not in SYNTHESES:
            raise HublabError(f"synthesis: unknown {quote(synthesis)}; use one of {', '.join(SYNTHESES)}")
        asked = synthesis
        if constraint is not None and synthesis in ("concatenate", "weighted"):
            synthesis = "best"
        t0 = time.perf_counter()
        selection = self.route(query, routing)
        t_route = time.perf_counter() - t0
        emit("route", {"decision": selection.to_dict()})
        notes = [selection.note, self.router_note]
        if asked != synthesis:
            notes.append(f"{asked} would {'join' if asked == 'concatenate' else 'blend'} documents of the asked "
                         f"format: {synthesis} picked one")
        result = EnsembleResult(query=query, answer="", routing=selection.routing, synthesis=synthesis,
                           selection=selection, note="; ".join(n for n in notes if n))
        result.constraint = constraint
        gen_opts = {"max_tokens": max_tokens, "temperature": temperature, "cancel": cancel, **sampler,
                    "grammar": constraint.grammar if constraint is not None else None}
        remote = [n for n in selection.names if self.rt.experts[n].peer]
        if synthesis == "weighted" and remote:
            synthesis = result.synthesis = "best"
            result.note = "; ".join(n for n in (result.note, f"weighted blends next-token distributions, which "
                                                f"{', '.join(remote)} on other boards do not send: best picked one")
                                    if n)
        t1 = time.perf_counter()
        if synthesis == "weighted":
            self._weighted(result, emit, gen_opts)
        else:
            failed: list[str] = []
            result.answers = self._run_experts(query if prompt is None else prompt, selection, emit,
                                               logprobs=synthesis == "best", failed=failed, **gen_opts)
            result.note = "; ".join(n for n in (result.note, *failed) if n)
        t2 = time.perf_counter()
        stopped = cancel is not None and cancel.is_set()
        if stopped and synthesis != "weighted":
            # a stopped question starts nothing new: the answer is what the first expert had said so far
            result.answer = result.answers[0].text if result.answers else ""
            result.chosen = result.answers[0].expert if result.answers else None
            result.note = "; ".join(n for n in (result.note, f"stopped before {synthesis} synthesis") if n)
        elif synthesis != "weighted":
            emit("synth_start", {"synthesis": synthesis})
            getattr(self, f"_{synthesis}")(result, emit, gen_opts)
        t3 = time.perf_counter()
        result.timings = {"route_s": t_route, "experts_s": t2 - t1, "synthesis_s": t3 - t2, "total_s": t3 - t0}
        if cancel is not None and cancel.is_set():
            result.finish_reason = "cancelled"
        emit("done", {"result": result.to_dict()})
        return result

    # -- experts ----------------------------------------------------------------------------------------

    def _run_experts(self, query: str | list[dict], selection: Selection, emit: Event, logprobs: bool,
                     failed: list[str] | None = None, **opts) -> list[ExpertAnswer]:
        """Each selected expert's answer, in order. A remote expert whose peer fails (unreachable, gone mid-answer,
        past its deadline) is left out, with an `expert_error` event and a line in `failed`; when none answered,
        the fallback expert does, if it was not among them."""
        answers: list[ExpertAnswer] = []
        tried: set[str] = set()
        choices = list(selection.choices)

        def start(name: str):
            # a remote expert's token probabilities are asked for only where there is an answer to weigh it against
            asks = logprobs and (len(selection.choices) > 1 or not self.rt.experts[name].peer)
            return self.context.stream(name, query, logprobs=asks, query_embedding=selection.embedding, **opts)

        # the remote experts after the first start now, on their own boards, while the ones before them answer: a
        # question to two boards takes the longer answer, not the sum; their words are shown in turn all the same
        ahead = {c.name: _Ahead(lambda name=c.name: start(name)) for c in choices[1:] if self.rt.experts[c.name].peer}
        while choices:
            choice = choices.pop(0)
            if opts.get("cancel") is not None and opts["cancel"].is_set():
                break
            tried.add(choice.name)
            emit("expert_start", {"expert": choice.name, "score": choice.score})
            try:
                gen = ahead.pop(choice.name, None) or start(choice.name)
                for piece in gen:
                    emit("expert_token", {"expert": choice.name, "text": piece})
            except PeerError as exc:
                emit("expert_error", {"expert": choice.name, "error": str(exc)})
                if failed is not None:
                    failed.append(f"{choice.name} failed: {exc}")
                if not choices and not answers and self.fallback not in tried:
                    score = selection.score_of(self.fallback)
                    choices.append(type(choice)(self.fallback, score.score if score else 0.0))
                continue
            emit("expert_done", {"expert": choice.name, "result": gen.result.to_dict()})
            answers.append(ExpertAnswer(choice.name, choice.score, gen.result.text.strip(), result=gen.result))
        return answers

    # -- synthesis strategies -----------------------------------------------------------------------------

    def _finish(self, result: EnsembleResult, emit: Event, answer: str) -> None:
        result.answer = answer
        emit("answer_token", {"text": answer})

    def _best(self, result: EnsembleResult, emit: Event, opts: dict) -> None:
        # a server that sends no token probabilities (Ollama) is taken to be as sure as the others were on average
        known = [a.result.mean_token_prob for a in result.answers if a.result.mean_token_prob is not None]
        usual = sum(known) / len(known) if known else 1.0
        for a in result.answers:
            bad = degenerate(a.text, self.rt.config(a.expert).inference.system_prompt)
            prob = a.result.mean_token_prob if a.result.mean_token_prob is not None else usual
            a.confidence = 0.0 if bad else a.score * prob
        if not result.answers:
            return self._finish(result, emit, "")
        # ties: the higher router score, then the expert name, like routing itself
        win = min(_valid(result.answers, result.constraint),
                  key=lambda a: (-round(a.confidence, 12), -a.score, a.expert))
        result.chosen = win.expert
        self._finish(result, emit, win.text)

    def _voting(self, result: EnsembleResult, emit: Event, opts: dict) -> None:
        answers = result.answers
        if not answers:
            return self._finish(result, emit, "")
        if len(answers) > 1:
            router = self.router
            if router is None:
                raise HublabError("voting compares answers with the router's encoder, and no router is installed; "
                                  "build one with `hublab train router` or use synthesis best")
            sim = cosine_matrix(np.asarray(router.embed([a.text or " " for a in answers]), dtype=np.float64))
            for a, agreement in zip(answers, vote([a.score for a in answers], sim)):
                a.agreement = agreement
        else:
            answers[0].agreement = 1.0
        win = min(_valid(answers, result.constraint), key=lambda a: (-round(a.agreement, 12), -a.score, a.expert))
        result.chosen = win.expert
        self._finish(result, emit, win.text)

    def _concatenate(self, result: EnsembleResult, emit: Event, opts: dict) -> None:
        ordered = sorted(result.answers, key=lambda a: (-a.score, a.expert))
        text = "\n\n".join(f"### {a.expert} (score {a.score:.2f})\n{a.text}" for a in ordered)
        self._finish(result, emit, text)

    def _summarize(self, result: EnsembleResult, emit: Event, opts: dict) -> None:
        aggregator = self.rt.system.aggregator or self.fallback
        if aggregator not in self.rt.models:
            raise HublabError(f"[moe] aggregator: no model named {aggregator!r}; set it to an expert or leave it "
                              "empty to use the fallback expert")
        emit("expert_start", {"expert": aggregator, "score": 1.0, "role": "aggregator"})
        gen = self.context.stream(aggregator, summarize_prompt(result.query, result.answers), **opts)
        for piece in gen:
            emit("answer_token", {"text": piece})
        result.answer = gen.result.text.strip()
        result.chosen = aggregator
        result.answers.append(ExpertAnswer(f"{aggregator} (aggregator)", 1.0, result.answer, result=gen.result))

    def _weighted(self, result: EnsembleResult, emit: Event, opts: dict) -> None:
        weights = result.selection.weights()
        emit("synth_start", {"synthesis": "weighted", "weights": weights})
        for name, w in weights.items():
            emit("expert_start", {"expert": name, "score": w})
        gen = self.rt.mixture_stream(weights, result.query, max_tokens=opts.get("max_tokens"),
                                     temperature=opts.get("temperature"), cancel=opts.get("cancel"))
        for piece in gen:
            emit("answer_token", {"text": piece})
        result.answer = gen.result.text.strip()
        result.answers = [ExpertAnswer("+".join(weights), 1.0, result.answer, result=gen.result)]
        result.note = "; ".join(n for n in (result.note, "weights " + ", ".join(
            f"{k} {v:.2f}" for k, v in weights.items())) if n)
