"""The query router on the device: an ONNX encoder + linear head scores every expert, keywords add evidence.

A router directory holds three files, all written by `hublab train router` (trainer/router.py):

- `model.onnx`: one graph, `input_ids, attention_mask -> probabilities [batch, n_experts]` (softmax of the
  head's logits divided by a calibrated temperature) and `embedding [batch, dim]` (the mean-pooled, L2
  normalised sentence embedding that voting synthesis compares answers with). Usually int8.
- `tokenizer.json`: the encoder's tokenizer (Hugging Face `tokenizers` format).
- `router.toml`: `[router] experts = [...]` in output order, `temperature`, `max_length`, `encoder`, `accuracy`.

Scores. `head_score` is the trained head's calibrated probability. Every expert with examples has a
`similarity`, through the same encoder: the mean cosine of the query to its `example_k` closest examples
("near"), and for deciding a new expert's claim, `(1 - example_centroid) * near + example_centroid *` the
cosine to the examples' mean direction (the nearest examples catch a query like one of them; the mean
direction weighs what they share, so one outlying example of a broad domain does not decide).
The router's own labelled queries (`examples.npz`, written by the trainer) are the examples of the experts
that own its outputs, joined by those experts' `[expert] examples`. For the experts the head knows, the
head is blended with a softmax of their near similarities over `example_temperature`:
`(1 - example_weight) * head + example_weight * softmax`. An expert the head does not know (a new
package) claims its `example_score` by a softmax over `example_temperature` of its claim similarity plus
`example_margin` (a specialist beats the broad domains it overlaps) against one "rest" entry: the best
claim similarity of the known experts (`example_floor` when the router ships no examples). The rest goes to the
known experts: `model_score = example_score + (1 - sum of example_scores) * blended head`. A query close to
no new expert leaves everything to the head and its examples, so thresholds and the fallback keep their
meaning; a new expert needs no retraining and leaves routing with its TOML. Examples are embedded on
first use (not at load: shell start stays fast) and cached by embcache, keyed by the encoder's and the
examples' hashes. The temperature, margin and centroid weight are calibrated by the trainer on open-set
domains of its own (trainer/data/router_openset.jsonl). `keyword_score` is the keyword
distribution: for each expert, the number of its distinct `keywords` found in the query (whole words or
phrases, case-folded, never substrings) divided by the hits of all experts together. The final score is
`(1 - w) * model_score + w * keyword_score` with `w = [moe] keyword_weight` (default 0.25); when no keyword
of any expert is found the final score is the model score alone. Both parts sum to 1 over the experts, so
the final scores do too.

Router outputs vs configured experts. An expert answers to the router output whose name equals its
`[expert] domain` (which defaults to its name); an output that no expert claims by domain goes to the
expert of that name. Several experts on one output share its probability equally. An output with no
expert (the router knows "rust", nobody installed a rust expert) gives its probability to the fallback
expert, so such queries land on the fallback. A configured expert the router has no output for gets model
score 0 and can still be picked through its examples, its keywords or by `all`. Both cases are warnings
(`Router.warnings`). It is an error when no configured expert matches any router output, or when the
fallback expert is not configured.

Strategies (`select`), over the final scores, best first:
- `topk:K`: the K best experts with a positive score.
- `threshold:T`: every expert whose score is at least max(T, its own `[expert] threshold`), and positive.
- `single`: the best expert (topk:1).
- `all`: every expert, whatever its score.
When nothing passes, the fallback expert is the answer: a selection is never empty. Ties are broken by
the higher score, then by expert name (alphabetical); scores equal to 1e-9 count as tied.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..config import Key, ConfigError, parse_routing, read_toml, validate_section, check_sections
from ..errors import HublabError
from ..engine.memory import drop_file_cache, release_free_memory

ROUTER_TOML = "router.toml"
TOKENIZER_JSON = "tokenizer.json"
MODEL_ONNX = "model.onnx"
EXAMPLES_NPZ = "examples.npz"  # the router's labelled queries: texts, labels, vectors, the encoder's sha256
# Keys written into the ONNX model's metadata so a model.onnx can be checked against its router.toml.
META_EXPERTS = "hublab.experts"
META_TEMPERATURE = "hublab.temperature"
TIE_EPSILON = 1e-9

ROUTER_SCHEMA: dict[str, dict[str, Key]] = {
    "router": {
        "format": Key(int, 1, "router directory format version"),
        "experts": Key(list, [], "expert (domain) names in the order of the model's outputs"),
        "temperature": Key(float, 1.0, "softmax temperature calibrated on held-out queries (baked into model.onnx)"),
        "max_length": Key(int, 128, "queries are truncated to this many tokens"),
        "encoder": Key(str, "", "the sentence encoder the router was built from"),
        "pooling": Key(str, "mean", "how token vectors become one query vector", ("mean",)),
        "quantization": Key(str, "", "int8-dynamic or none"),
        "accuracy": Key(float, 0.0, "accuracy measured on accuracy_split"),
        "accuracy_split": Key(str, "", "which queries accuracy was measured on: heldout or validation"),
        "macro_f1": Key(float, 0.0, "macro-averaged F1 on accuracy_split"),
        "examples": Key(int, 0, "number of labelled queries the head was fitted on"),
        "example_temperature": Key(float, 0.05, "softmax temperature over example similarities (calibrated)"),
        "example_margin": Key(float, 0.0, "added to a new expert's claim similarity against the known experts' "
                              "(calibrated)"),
        "example_weight": Key(float, 0.5, "weight of example similarity against the head for the known experts"),
        "example_floor": Key(float, 0.4, "the known experts' similarity when the router ships no examples"),
        "example_k": Key(int, 3, "an expert's similarity is the mean of its k closest examples"),
        "example_centroid": Key(float, 0.0, "weight of the cosine to an expert's examples' mean direction against "
                                "its k closest examples (calibrated)"),
    },
}


class RouterError(HublabError):
    """The router files are missing, corrupt or disagree with each other or with the experts."""


# ---------------------------------------------------------------------------------------------------
# Results: every decision carries its scores, all the way to the shell and the API.

@dataclass(frozen=True)
class RouteScore:
    """One expert's score for a query: the blend, and the parts it was blended from.

    score = (1 - w) * model_score + w * keyword_score (see the module docstring). For an expert the head
    knows, example_score is its share of a softmax over the known experts' similarities and
    model_score = (1 - new experts' example_scores) * ((1 - example_weight) * head + example_weight *
    example); for a new expert (no head output) model_score = example_score. `similarity` is the query's
    similarity to the expert's examples that its score used: near for a known expert, claim for a new one
    (None when it has none).
    """
    expert: str
    score: float
    model_score: float
    keyword_score: float = 0.0
    keywords: tuple[str, ...] = ()
    head_score: float | None = None
    example_score: float = 0.0
    similarity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "score": self.score, "model_score": self.model_score,
                "head_score": self.model_score if self.head_score is None else self.head_score,
                "example_score": self.example_score, "similarity": self.similarity,
                "keyword_score": self.keyword_score, "keywords": list(self.keywords)}


@dataclass(frozen=True)
class RouteChoice:
    """A selected expert and the score it was selected with."""
    name: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score}


@dataclass(frozen=True)
class Selection:
    """The experts a strategy picked (best first, never empty) and every expert's score."""
    routing: str
    choices: tuple[RouteChoice, ...]
    scores: tuple[RouteScore, ...]
    fallback: bool = False
    note: str = ""
    embedding: Any = field(default=None, compare=False, repr=False)  # the query's, when the encoder made one

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.choices]

    @property
    def top(self) -> RouteChoice:
        return self.choices[0]

    def weights(self) -> dict[str, float]:
        """The choices' scores renormalised to sum to 1 (equal weights when they are all zero)."""
        total = sum(c.score for c in self.choices)
        if total <= 0:
            return {c.name: 1.0 / len(self.choices) for c in self.choices}
        return {c.name: c.score / total for c in self.choices}

    def score_of(self, expert: str) -> RouteScore | None:
        return next((s for s in self.scores if s.expert == expert), None)

    def to_dict(self) -> dict[str, Any]:
        return {"routing": self.routing, "selected": [c.to_dict() for c in self.choices],
                "fallback": self.fallback, "note": self.note, "scores": [s.to_dict() for s in self.scores]}


# ---------------------------------------------------------------------------------------------------
# Keywords: whole words and phrases, case-folded, never substrings.

def keyword_pattern(keyword: str) -> re.Pattern[str]:
    """Regex for one keyword: its words in order, any whitespace between them, whole at both ends.

    A match may not touch a letter, digit or underscore on either side, and may not be followed by '+'
    or '#', so "go" misses "django" and "golang", "c" misses "c++" and "c#", while "c++", "node.js" and
    "machine learning" match as written (a sentence's full stop or comma after them is fine).
    """
    words = keyword.casefold().split()
    if not words:
        raise ValueError("empty keyword")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?![\w+#])")


def keyword_hits(text: str, keywords: Sequence[str]) -> tuple[str, ...]:
    """The distinct keywords (as configured) found in text."""
    folded = text.casefold()
    seen: set[str] = set()
    hits = []
    for kw in keywords:
        key = " ".join(kw.casefold().split())
        if key and key not in seen and keyword_pattern(kw).search(folded):
            seen.add(key)
            hits.append(kw)
    return tuple(hits)


def blend(text: str, model_scores: Mapping[str, float], keywords: Mapping[str, Sequence[str]] | None = None,
          keyword_weight: float = 0.25, parts: Mapping[str, tuple[float, float, float | None]] | None = None
          ) -> list[RouteScore]:
    """Blend model scores with the keyword distribution (see the module docstring); best first.

    `parts`: expert -> (head_score, example_score, similarity), carried into each RouteScore for display.
    """
    if not 0.0 <= keyword_weight <= 1.0:
        raise RouterError(f"[moe] keyword_weight: {keyword_weight} is out of range; use a value between 0 and 1")
    keywords = keywords or {}
    hits = {name: keyword_hits(text, keywords.get(name, ())) for name in model_scores}
    total = sum(len(h) for h in hits.values())
    out = []
    for name, model in model_scores.items():
        share = len(hits[name]) / total if total else 0.0
        score = (1.0 - keyword_weight) * model + keyword_weight * share if total else model
        head, example, sim = (parts or {}).get(name, (None, 0.0, None))
        out.append(RouteScore(name, float(score), float(model), float(share), hits[name], head, example, sim))
    return sorted(out, key=_rank)


def _rank(s: RouteScore | RouteChoice) -> tuple[float, str]:
    # Round so that float noise (0.30000000000000004 vs 0.3) does not decide a tie.
    name = s.expert if isinstance(s, RouteScore) else s.name
    return (-round(s.score / TIE_EPSILON) * TIE_EPSILON, name)


# ---------------------------------------------------------------------------------------------------
# Strategies.

def select(scores: Sequence[RouteScore] | Mapping[str, float], routing: str, fallback: str,
           thresholds: Mapping[str, float] | None = None, sure: float = 1.0) -> Selection:
    """Apply a routing strategy (topk:K, threshold:T, single, all) to every expert's score.

    Never empty: when nothing passes, the fallback expert is chosen. Ties: higher score, then name.
    topk takes the top expert alone when its score reaches `sure`: a second opinion costs a whole answer's
    time and only helps when the router is unsure.
    """
    if isinstance(scores, Mapping):
        scores = [RouteScore(name, float(v), float(v)) for name, v in scores.items()]
    ranked = sorted(scores, key=_rank)
    names = [s.expert for s in ranked]
    if fallback not in names:
        raise RouterError(f"[moe] fallback: {fallback!r} is not one of the experts "
                          f"({', '.join(sorted(names)) or 'none'}); "
                          "set [moe] fallback to one of them")
    try:
        kind, arg = parse_routing(routing)
    except ValueError as exc:
        raise RouterError(f"[moe] routing: {exc}") from None
    spec = f"{kind}:{arg:g}" if kind in ("topk", "threshold") else kind
    thresholds = thresholds or {}
    positive = [s for s in ranked if s.score > TIE_EPSILON]
    note = ""
    if kind == "all":
        chosen = ranked
    elif kind in ("topk", "single"):
        chosen = positive[: int(arg) if kind == "topk" else 1]
        if not chosen:
            note = "no expert has a positive score"
        elif len(chosen) > 1 and chosen[0].score + TIE_EPSILON >= sure:
            chosen = chosen[:1]
            note = f"{chosen[0].expert} scores {chosen[0].score:.2f} >= sure {sure:g}: one expert answers"
    else:
        chosen = [s for s in positive if s.score + TIE_EPSILON >= max(arg, thresholds.get(s.expert, 0.0))]
        if not chosen:
            note = f"no expert reached its threshold (routing {spec}, best {ranked[0].expert} {ranked[0].score:.3f})"
    if not chosen:
        fb = next(s for s in ranked if s.expert == fallback)
        return Selection(spec, (RouteChoice(fb.expert, fb.score),), tuple(ranked), True,
                         f"{note}; the fallback expert {fallback!r} answers")
    return Selection(spec, tuple(RouteChoice(s.expert, s.score) for s in chosen), tuple(ranked), False, note)


# ---------------------------------------------------------------------------------------------------
# The router files.

@dataclass(frozen=True)
class RouterInfo:
    """router.toml, validated."""
    path: Path
    experts: tuple[str, ...]
    temperature: float
    max_length: int
    encoder: str = ""
    quantization: str = ""
    accuracy: float = 0.0
    accuracy_split: str = ""
    macro_f1: float = 0.0
    examples: int = 0
    example_temperature: float = 0.05
    example_margin: float = 0.0
    example_weight: float = 0.5
    example_floor: float = 0.4
    example_k: int = 3
    example_centroid: float = 0.0


def read_router_toml(path: Path) -> RouterInfo:
    """Read and validate a router.toml."""
    try:
        data, text = read_toml(path)
        check_sections(path, text, data, ROUTER_SCHEMA)
        sec = validate_section(path, text, "router", data.get("router", {}), ROUTER_SCHEMA["router"])
    except ConfigError as exc:
        raise RouterError(str(exc)) from None
    experts = sec["experts"]
    if not experts:
        raise RouterError(f"{path}: [router] experts: missing or empty; list the expert names in the model's output "
                          "order")
    bad = [e for e in experts if not isinstance(e, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", e)]
    if bad:
        raise RouterError(f"{path}: [router] experts: {bad[0]!r} is not a valid expert name; use letters, digits, "
                          "'.', '_' and '-'")
    dupes = sorted({e for e in experts if experts.count(e) > 1})
    if dupes:
        raise RouterError(f"{path}: [router] experts: {dupes[0]!r} is listed twice; each output needs its own name")
    if not sec["temperature"] > 0:
        raise RouterError(f"{path}: [router] temperature: {sec['temperature']} must be positive; rebuild the router")
    if not sec["example_temperature"] > 0:
        raise RouterError(f"{path}: [router] example_temperature: {sec['example_temperature']} must be positive; "
                          "use e.g. 0.05 or rebuild the router")
    if not 0.0 <= sec["example_weight"] <= 1.0:
        raise RouterError(f"{path}: [router] example_weight: {sec['example_weight']} is out of range; use 0..1")
    if not 0.0 <= sec["example_centroid"] <= 1.0:
        raise RouterError(f"{path}: [router] example_centroid: {sec['example_centroid']} is out of range; use 0..1")
    if sec["example_k"] < 1:
        raise RouterError(f"{path}: [router] example_k: {sec['example_k']} must be at least 1; use e.g. 3")
    if sec["max_length"] < 4:
        raise RouterError(f"{path}: [router] max_length: {sec['max_length']} is too small; use e.g. 128")
    return RouterInfo(path=path, experts=tuple(experts), temperature=sec["temperature"], max_length=sec["max_length"],
                      encoder=sec["encoder"], quantization=sec["quantization"], accuracy=sec["accuracy"],
                      accuracy_split=sec["accuracy_split"], macro_f1=sec["macro_f1"], examples=sec["examples"],
                      example_temperature=sec["example_temperature"], example_margin=sec["example_margin"],
                      example_weight=sec["example_weight"], example_floor=sec["example_floor"],
                      example_k=sec["example_k"], example_centroid=sec["example_centroid"])


@dataclass(frozen=True)
class ExpertRoute:
    """What routing needs to know about one configured expert (a ModelConfig has all of it)."""
    name: str
    domain: str = ""
    keywords: tuple[str, ...] = ()
    threshold: float = 0.0
    examples: tuple[str, ...] = ()

    @classmethod
    def of(cls, expert: Any) -> "ExpertRoute":
        if isinstance(expert, ExpertRoute):
            return expert
        if isinstance(expert, str):
            return cls(expert)
        return cls(expert.name, getattr(expert, "domain", "") or "", tuple(getattr(expert, "keywords", ()) or ()),
                   float(getattr(expert, "threshold", 0.0) or 0.0), tuple(getattr(expert, "examples", ()) or ()))

    @property
    def label(self) -> str:
        return self.domain or self.name


def map_experts(labels: Sequence[str], experts: Sequence[ExpertRoute], fallback: str,
                source: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Router output -> the configured experts that share it, plus warnings; errors when nothing fits."""
    names = [e.name for e in experts]
    if fallback not in names:
        raise RouterError(f"[moe] fallback: no configured expert named {fallback!r} (experts: "
                          f"{', '.join(sorted(names))}); "
                          "set [moe] fallback to one of them or add that expert")
    owners: dict[str, list[str]] = {}
    warnings = []
    for label in labels:
        by_domain = [e.name for e in experts if e.label == label]
        owners[label] = by_domain or [e.name for e in experts if e.name == label]
    mapped = {n for group in owners.values() for n in group}
    if not mapped:
        raise RouterError(f"{source}: [router] experts: none of {', '.join(labels)} matches a configured expert's "
                          f"domain or name ({', '.join(sorted(names))}); rebuild the router for these experts "
                          "or set each expert's [expert] domain to one of the router's outputs")
    for label, group in owners.items():
        if not group:
            warnings.append(f"router output {label!r} has no configured expert; its score goes to the fallback "
                            f"{fallback!r}")
    for e in experts:
        if e.name not in mapped and not e.examples:
            warnings.append(f"expert {e.name!r} (domain {e.label!r}) has no router output; only its keywords can "
                            "select it (add [expert] examples, or rebuild the router with that domain)")
    return owners, warnings


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Router:
    """A loaded router bound to the configured experts. `score` for every expert, `route` to select."""

    def __init__(self, directory: Path, info: RouterInfo, session: Any, tokenizer: Any,
                 experts: Sequence[ExpertRoute], owners: dict[str, list[str]], fallback: str,
                 keyword_weight: float, warnings: list[str]):
        self.directory = directory
        self.info = info
        self.session = session
        self.tokenizer = tokenizer
        self.experts = list(experts)
        self.owners = owners
        self.fallback = fallback
        self.keyword_weight = keyword_weight
        self.warnings = warnings
        self._input_types = {i.name: i.type for i in session.get_inputs()}
        self.has_embedding = any(o.name == "embedding" for o in session.get_outputs())
        self._encoder_id: str | None = None
        self._examples: tuple[Any, Any, list[str], list[bool], Any] | None = None  # see example_index

    @property
    def labels(self) -> tuple[str, ...]:
        """The router's outputs, in model order."""
        return self.info.experts

    @classmethod
    def load(cls, directory: Path, experts: Iterable[Any] | None = None, *, keyword_weight: float = 0.25,
             fallback: str = "general", threads: int = 1) -> "Router":
        """Open a router directory; experts (ModelConfig, ExpertRoute or names) default to the router's outputs.

        `threads`: onnxruntime intra-op threads; 0 = its own choice (all cores). One is the default because
        a short query finishes sooner on one thread than split over busy cores (bench/router.py, 2 cores:
        p50 3.5 ms on one thread, 7.2 ms on two), and on a Pi the other cores belong to llama.cpp.
        """
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise RouterError(f"{directory}: router directory not found; build one with "
                              "`hublab train router DATA OUT` or set [moe] router in system.toml")
        info = read_router_toml(directory / ROUTER_TOML)
        tok_path, onnx_path = directory / TOKENIZER_JSON, directory / MODEL_ONNX
        for p in (tok_path, onnx_path):
            if not p.is_file():
                raise RouterError(f"{p}: file not found; a router directory needs {ROUTER_TOML}, {TOKENIZER_JSON} "
                                  f"and {MODEL_ONNX} (rebuild it with `hublab train router`)")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise RouterError(f"{tok_path}: not a valid tokenizers file ({_first_line(exc)}); "
                              "copy the encoder's tokenizer.json back or rebuild the router") from None
        tokenizer.no_padding()
        tokenizer.enable_truncation(info.max_length)

        options = ort.SessionOptions()
        options.log_severity_level = 3  # the CLI shows our errors, not onnxruntime's log lines
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RouterError(f"{onnx_path}: not a loadable ONNX model ({_first_line(exc)}); "
                              "rebuild it with `hublab train router` or reinstall the router") from None
        release_free_memory()  # the parsed protobuf is scratch once the session holds the weights (~6 MB)
        drop_file_cache(onnx_path, tok_path)  # read into the session and the tokenizer: the cached pages are spare
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if not {"input_ids", "attention_mask"} <= inputs or "probabilities" not in outputs:
            raise RouterError(f"{onnx_path}: expected inputs input_ids, attention_mask and output probabilities, found "
                              f"inputs {', '.join(sorted(inputs))} and outputs {', '.join(sorted(outputs))}; "
                              "this is not a hublab router model, rebuild it with `hublab train router`")
        meta = session.get_modelmeta().custom_metadata_map or {}
        if META_EXPERTS in meta:
            try:
                built_for = tuple(json.loads(meta[META_EXPERTS]))
            except (ValueError, TypeError):
                built_for = (meta[META_EXPERTS],)
            if built_for != info.experts:
                raise RouterError(f"{info.path}: [router] experts {list(info.experts)} disagree with the experts "
                                  f"{list(built_for)} that {onnx_path.name} was built for; restore the matching "
                                  "router.toml or rebuild the router")
        if not experts:
            targets = [ExpertRoute(label) for label in info.experts]
        else:
            targets = [ExpertRoute.of(e) for e in experts]
        owners, warnings = map_experts(info.experts, targets, fallback, info.path)
        router = cls(directory, info, session, tokenizer, targets, owners, fallback, keyword_weight, warnings)
        # One probe query checks the output width against router.toml now, not on the first user query.
        try:
            probs = router.probabilities("hello")
        except RouterError:
            raise
        except Exception as exc:
            raise RouterError(f"{onnx_path}: running the model failed ({_first_line(exc)}); rebuild it with "
                              "`hublab train router`") from None
        if probs.shape != (len(info.experts),):
            raise RouterError(f"{onnx_path}: outputs {probs.size} scores but {info.path.name} [router] experts names "
                              f"{len(info.experts)}; use the router.toml that came with this model or rebuild the "
                              "router")
        if not np.all(np.isfinite(probs)) or abs(float(probs.sum()) - 1.0) > 1e-3 or probs.min() < 0:
            raise RouterError(f"{onnx_path}: output probabilities do not form a distribution (sum "
                              f"{float(probs.sum()):.4f}); "
                              "rebuild the router")
        blend("", {e.name: 0.0 for e in targets}, router.keywords, keyword_weight)  # validates the weight
        return router

    # -- model ----------------------------------------------------------------------------------------

    def _feeds(self, text: str) -> dict[str, Any]:
        import numpy as np

        enc = self.tokenizer.encode(text)
        feeds = {}
        for name, values in (("input_ids", enc.ids), ("attention_mask", enc.attention_mask),
                             ("token_type_ids", enc.type_ids)):
            if name in self._input_types:
                dtype = np.int32 if self._input_types[name] == "tensor(int32)" else np.int64
                feeds[name] = np.asarray([values], dtype=dtype)
        return feeds

    def probabilities(self, text: str):
        """The model's calibrated probability for each router output (numpy vector, router order)."""
        (probs,) = self.session.run(["probabilities"], self._feeds(text))
        return probs[0]

    @property
    def encoder_id(self) -> str:
        """sha256 of model.onnx: what embeddings cached elsewhere (knowledge packs) are keyed by."""
        if self._encoder_id is None:
            from ..pkg.manifest import sha256_file

            self._encoder_id = sha256_file(self.directory / MODEL_ONNX)
        return self._encoder_id

    def embed(self, texts: Sequence[str]):
        """L2-normalised sentence embeddings (n, dim) from the router's encoder, e.g. to compare answers.

        One text per run: int8 activations are quantised per batch, so batching would change the numbers.
        """
        import numpy as np

        if not self.has_embedding:
            raise RouterError(f"{self.directory / MODEL_ONNX}: has no embedding output; rebuild the router "
                              "with `hublab train router`")
        rows = [self.session.run(["embedding"], self._feeds(t))[0][0] for t in texts]
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    # -- experts --------------------------------------------------------------------------------------

    @property
    def keywords(self) -> dict[str, tuple[str, ...]]:
        return {e.name: e.keywords for e in self.experts}

    @property
    def thresholds(self) -> dict[str, float]:
        return {e.name: e.threshold for e in self.experts}

    def head_scores(self, probs) -> dict[str, float]:
        """Head probabilities moved onto the configured experts (see the module docstring)."""
        out = {e.name: 0.0 for e in self.experts}
        for label, p in zip(self.labels, probs):
            group = self.owners.get(label) or [self.fallback]
            for name in group:
                out[name] += float(p) / len(group)
        return out

    @property
    def has_examples(self) -> bool:
        """True when some expert is routed by examples of its own (shipped label examples alone change nothing)."""
        return self.has_embedding and any(e.examples for e in self.experts)

    def label_examples(self) -> dict[str, list]:
        """Router output -> its labelled queries' vectors from examples.npz ({} when the router has none).

        Vectors are used as shipped when the file names this model.onnx's hash; otherwise its texts are
        embedded again (and cached), so a mismatched file costs time once, never a wrong answer.
        """
        import numpy as np

        path = self.directory / EXAMPLES_NPZ
        if not path.is_file():
            return {}
        texts, labels, vectors = read_examples(path, self.encoder_id)
        vectors = vectors.astype(np.float32) if vectors is not None else None
        if vectors is None or len(vectors) != len(texts):
            from .embcache import cached_embeddings

            vectors = cached_embeddings("examples", texts, self.encoder_id, self.embed)
        out: dict[str, list] = {}
        for label, v in zip(labels, vectors):
            out.setdefault(label, []).append(v)
        return out

    def example_index(self):
        """(vectors (n, dim), expert index of each row, expert names, known flags, unit mean vector of each
        expert's examples): built on first use."""
        if self._examples is None:
            import numpy as np

            from .embcache import cached_embeddings

            named = [e for e in self.experts if e.examples]
            texts = [t for e in named for t in e.examples]
            own = cached_embeddings("examples", texts, self.encoder_id, self.embed) if texts else None
            labelled = self.label_examples()
            known = {n for group in self.owners.values() for n in group}
            rows, owner, names = [], [], []
            for e in self.experts:
                vecs = []
                for label, group in self.owners.items():
                    if e.name in group:
                        vecs.extend(labelled.get(label, []))
                if e.examples:
                    at = sum(len(x.examples) for x in named[:named.index(e)])
                    vecs.extend(own[at:at + len(e.examples)])
                if vecs:
                    owner.extend([len(names)] * len(vecs))
                    rows.extend(vecs)
                    names.append(e.name)
            vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 1), np.float32)
            owner = np.asarray(owner, dtype=np.int64)
            means = [vectors[owner == i].mean(axis=0) for i in range(len(names))]
            centroids = (np.stack([m / (np.linalg.norm(m) or 1.0) for m in means]).astype(np.float32) if means
                         else np.zeros((0, 1), np.float32))
            self._examples = (vectors, owner, names, [n in known for n in names], centroids)
        return self._examples

    def similarities(self, embedding) -> tuple[dict[str, float], dict[str, float]]:
        """Each expert with examples: (near, claim). `near` is the mean cosine of the query to the expert's
        `example_k` closest examples; `claim` blends it with the cosine to the examples' mean direction
        (`example_centroid` of the latter): what a new expert's claim is decided on."""
        import numpy as np

        vectors, owner, names, _, centroids = self.example_index()
        query = np.asarray(embedding, dtype=np.float32)
        sims = vectors @ query
        to_centre = centroids @ query
        k, c = self.info.example_k, self.info.example_centroid
        near, claim = {}, {}
        for i, name in enumerate(names):
            mine = sims[owner == i]
            top = mine if len(mine) <= k else np.partition(mine, len(mine) - k)[-k:]
            near[name] = float(top.mean())
            claim[name] = (1 - c) * near[name] + c * float(to_centre[i])
        return near, claim

    def model_parts(self, text: str) -> tuple[dict[str, float], dict[str, tuple[float, float, float | None]], Any]:
        """Model score per expert, its parts (head_score, example_score, similarity) and the query's embedding
        (None when the encoder gives none) for one query."""
        if not self.has_embedding or (not self.has_examples and not (self.directory / EXAMPLES_NPZ).is_file()):
            if self.has_embedding:
                probs, embedding = self.session.run(["probabilities", "embedding"], self._feeds(text))
                head = self.head_scores(probs[0])
                return head, {n: (h, 0.0, None) for n, h in head.items()}, embedding[0]
            head = self.head_scores(self.probabilities(text))
            return head, {n: (h, 0.0, None) for n, h in head.items()}, None
        probs, embedding = self.session.run(["probabilities", "embedding"], self._feeds(text))
        head = self.head_scores(probs[0])
        sims, claim = self.similarities(embedding[0])
        _, _, names, known_flags, _ = self.example_index()
        known = {n for n, k in zip(names, known_flags) if k}
        info = self.info
        t = info.example_temperature
        # Known experts: the head blended with a softmax of their similarities.
        knn: dict[str, float] = {}
        blended = dict(head)
        if known:
            top = max(sims[n] for n in known)
            e = {n: math.exp((sims[n] - top) / t) for n in known}
            total = sum(e.values())
            knn = {n: v / total for n, v in e.items()}
            w = info.example_weight
            blended = {n: (1 - w) * h + w * knn.get(n, 0.0) for n, h in head.items()}
        # New experts claim their share against the best known claim similarity (the "rest").
        new = {n: s + info.example_margin for n, s in claim.items() if n not in known}
        rest = max(claim[n] for n in known) if known else info.example_floor
        shares: dict[str, float] = {}
        if new:
            top = max(rest, *new.values())
            e = {n: math.exp((v - top) / t) for n, v in new.items()}
            total = math.exp((rest - top) / t) + sum(e.values())
            shares = {n: v / total for n, v in e.items()}
        left = max(0.0, 1.0 - sum(shares.values()))
        model = {n: shares.get(n, 0.0) + left * blended[n] for n in head}
        return model, {n: (head[n], shares.get(n, knn.get(n, 0.0)), sims.get(n) if n in known else claim.get(n))
                       for n in head}, embedding[0]

    def model_scores(self, text: str) -> dict[str, float]:
        """Every configured expert's model score: examples' shares first, the head's for the rest."""
        return self.model_parts(text)[0]

    def score(self, text: str) -> list[RouteScore]:
        """Every configured expert's score for a query, best first."""
        model, parts, _ = self.model_parts(text)
        return blend(text, model, self.keywords, self.keyword_weight, parts)

    def route(self, text: str, routing: str = "topk:2", fallback: str | None = None, sure: float = 1.0) -> Selection:
        """Score a query and apply a strategy with the experts' own thresholds; the selection carries the
        query's embedding down to the knowledge lookup (one encoder run per question)."""
        model, parts, embedding = self.model_parts(text)
        scores = blend(text, model, self.keywords, self.keyword_weight, parts)
        return replace(select(scores, routing, fallback or self.fallback, self.thresholds, sure), embedding=embedding)


def read_examples(path: Path, encoder_id: str | None = None) -> tuple[list[str], list[str], Any]:
    """examples.npz's texts, their labels and (when `encoder_id` names the encoder that made them) their vectors as
    stored, else None; RouterError when the file cannot be read."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            texts, labels = [str(t) for t in data["texts"]], [str(x) for x in data["labels"]]
            vectors = data["vectors"] if encoder_id is not None and str(data["encoder"]) == encoder_id else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise RouterError(f"{path}: unreadable ({_first_line(exc)}); rebuild the router or delete the file "
                          "(routing then uses the head alone)") from None
    return texts, labels, vectors


def label_texts(directory: Path) -> dict[str, list[str]]:
    """Router output -> its labelled queries (examples.npz's texts), what another board's router routes this board's
    experts by; {} when the directory has no readable examples.npz."""
    try:
        texts, labels, _ = read_examples(Path(directory) / EXAMPLES_NPZ)
    except RouterError:
        return {}
    out: dict[str, list[str]] = {}
    for label, text in zip(labels, texts):
        out.setdefault(label, []).append(text)
    return out


def default_router_dir(system: Any) -> Path:
    """[moe] router, else <models_dir>/router, else the embedded default set's router."""
    if system.router_dir:
        return Path(system.router_dir)
    mine = Path(system.models_dir) / "router"
    defaults = getattr(system, "defaults_dir", None)
    return mine if defaults is None or mine.is_dir() else Path(defaults) / "router"


# ---------------------------------------------------------------------------------------------------
# `hublab route "query"`

def add_arguments(parser) -> None:
    parser.add_argument("query", nargs="+", help="the question to route")
    parser.add_argument("--routing", help="strategy: topk:K, threshold:T, single or all (default: [moe] routing)")
    parser.add_argument("--router", help="router directory (default: [moe] router or <models_dir>/router)")
    parser.add_argument("--keyword-weight", type=float, help="weight of keyword evidence, 0..1 (default: [moe] "
                                                             "keyword_weight)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def cli(args) -> int:
    from ..config import load_system, scan_models

    system = load_system()
    catalog = scan_models(system.models_dir)
    for err in catalog.errors:
        print(f"hublab: warning: {err}", file=sys.stderr)
    router_dir = Path(args.router) if args.router else default_router_dir(system)
    weight = system.keyword_weight if args.keyword_weight is None else args.keyword_weight
    experts = list(catalog.experts.values())
    notes = []
    if not experts:
        notes.append(f"no experts configured in {system.models_dir}; scoring the router's own outputs")
    routing = args.routing or system.routing
    try:
        parse_routing(routing)  # before loading anything: a typo should not cost a model load
    except ValueError as exc:
        raise RouterError(f"--routing: {exc}") from None
    router = Router.load(router_dir, experts or None, keyword_weight=weight, fallback=system.fallback)
    query = " ".join(args.query)
    start = time.perf_counter()
    selection = router.route(query, routing)
    elapsed_ms = (time.perf_counter() - start) * 1000
    notes.extend(router.warnings)
    if args.json:
        print(json.dumps({"query": query, "router": str(router_dir), **selection.to_dict(),
                          "warnings": notes, "latency_ms": round(elapsed_ms, 2)}, indent=2))
        return 0
    for note in notes:
        print(f"hublab: warning: {note}", file=sys.stderr)
    info = router.info
    acc = f", {info.accuracy_split} accuracy {info.accuracy:.3f}" if info.accuracy else ""
    print(f"router {router_dir} ({len(info.experts)} outputs, {info.quantization or 'fp32'}{acc})")
    chosen = set(selection.names)
    width = max(len("expert"), *(len(s.expert) for s in selection.scores))
    print(f"  {'expert':<{width}}  score  model   head  examples (sim)  keyword")
    for s in selection.scores:
        mark = "  <- selected" if s.expert in chosen else ""
        kws = f"  [{', '.join(s.keywords)}]" if s.keywords else ""
        head = s.model_score if s.head_score is None else s.head_score
        sim = f"({s.similarity:.2f})" if s.similarity is not None else "(-)"
        print(f"  {s.expert:<{width}}  {s.score:.3f}  {s.model_score:.3f}  {head:.3f}  {s.example_score:.3f} {sim:>7}"
              f"  {s.keyword_score:.3f}{kws}{mark}")
    picked = ", ".join(f"{c.name} ({c.score:.3f})" for c in selection.choices)
    print(f"{selection.routing}: {picked}" + (f"  ({selection.note})" if selection.note else "")
          + f"  [{elapsed_ms:.1f} ms]")
    return 0
