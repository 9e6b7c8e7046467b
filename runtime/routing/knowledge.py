"""An expert's knowledge pack: question/answer pairs it retrieves and shows the model before the question.

A 270M model knows little; shown a close, correct answer it answers in its voice and often with its facts.
The pack is a JSONL of {"question", "response"} records (`[expert] knowledge`), embedded once with the router's
encoder (the same MiniLM that routes, so no second model on the device). Embeddings are cached
under the state dir keyed by the pack's and the encoder's hashes: a changed pack or a new router gives a
new cache, never a stale one. Retrieval is one matrix-vector product.

A pack may also hold documentation passages, {"passage", "source"} records (`hublab knowledge build`,
runtime/routing/docs.py writes them into a knowledge package with a `knowledge.toml`): a passage is embedded
as its source and text, put into the question's own turn under its source, and the answer cites the source.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embcache import cached_embeddings
from ..config import Key, check_sections, read_toml, validate_section
from ..errors import HublabError
from ..pkg.manifest import sha256_file
from ..engine.memory import drop_file_cache


def read_pack(path: Path) -> list[dict]:
    """The pack's records; a bad line is a one-line error naming the file and line."""
    try:
        with path.open(encoding="utf-8") as f:  # a line at a time: a documentation pack is megabytes
            return _read_records(path, f)
    except FileNotFoundError:
        raise HublabError(f"{path}: knowledge pack not found; fix [expert] knowledge or reinstall the expert") from None
    except UnicodeDecodeError:
        raise HublabError(f"{path}: knowledge pack is not UTF-8 text; rewrite it as UTF-8 JSONL") from None


def _read_records(path: Path, lines) -> list[dict]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise HublabError(f"{path}:{n}: not a JSON object; each line is "
                              '{"question": ..., "response": ...}') from None
        if is_passage(rec):
            if not (isinstance(rec["passage"], str) and isinstance(rec.get("source"), str) and rec["passage"].strip()
                    and rec["source"].strip()):
                raise HublabError(f"{path}:{n}: a passage needs non-empty string fields passage and source")
            out.append({"passage": rec["passage"].strip(), "source": rec["source"].strip()})
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("question"), str) and isinstance(rec.get("response"), str)
                and rec["question"].strip() and rec["response"].strip()):
            raise HublabError(f"{path}:{n}: needs non-empty string fields question and response (or passage and "
                              "source)")
        out.append({"question": rec["question"].strip(), "response": rec["response"].strip()})
    return out


def is_passage(rec: dict) -> bool:
    """A documentation passage ({"passage", "source"}), not a question/answer pair."""
    return isinstance(rec, dict) and "passage" in rec


def key_text(rec: dict) -> str:
    """What a record is found by: a pair's question; a passage's source and text (the encoder reads the first
    128 tokens, so the source's name leads)."""
    return f"{rec['source']}: {rec['passage']}" if is_passage(rec) else rec["question"]


@dataclass
class Pack:
    path: Path
    records: list[dict]
    vectors: np.ndarray    # (n, dim) unit rows, float32; float16 for documentation (half the memory)

    def nearest(self, query_vec: np.ndarray, k: int, min_similarity: float) -> list[tuple[float, dict]]:
        """Up to k records most similar to the query, best first, at least `min_similarity`."""
        if k <= 0 or not len(self.records):
            return []
        q = query_vec.astype(np.float32)
        if self.vectors.dtype == np.float32:
            sims = self.vectors @ q
        else:  # float16 rows summed in float32, a block at a time (no float32 copy of the whole index)
            sims = np.concatenate([self.vectors[i:i + 4096].astype(np.float32) @ q
                                   for i in range(0, len(self.vectors), 4096)])
        top = np.argsort(-sims)[:k]
        return [(float(sims[i]), self.records[i]) for i in top if sims[i] >= min_similarity]


class Library:
    """Packs by path, embedded on first use with one encoder (`embed(texts) -> unit rows`)."""

    def __init__(self, embed, encoder_id: str):
        self.embed = embed
        self.encoder_id = encoder_id
        self._packs: dict[Path, Pack] = {}
        self._lock = threading.Lock()

    def pack(self, path: Path) -> Pack:
        with self._lock:
            if path not in self._packs:
                self._packs[path] = self._load(path)
            return self._packs[path]

    def _load(self, path: Path) -> Pack:
        records = read_pack(path)
        vectors = None
        side = sidecar(path, pack_key(path, self.encoder_id))
        if side.is_file():
            try:
                vectors = np.load(side, allow_pickle=False)
                # pairs stay float32 as before; a documentation index (thousands of passages) stays float16
                vectors = vectors.astype(np.float16 if records and is_passage(records[0]) else np.float32,
                                         copy=False)
            except (OSError, ValueError):
                vectors = None  # a torn or foreign file: embed instead
            if vectors is not None and vectors.shape[0] != len(records):
                vectors = None
        if vectors is None:
            vectors = cached_embeddings("knowledge", [key_text(r) for r in records], self.encoder_id, self.embed)
        drop_file_cache(path, side)  # held in memory now: a small board wants the cached pages back
        return Pack(path, records, vectors)


def pack_key(path: Path, encoder_id: str) -> str:
    return hashlib.sha256(f"{sha256_file(path)}:{encoder_id}".encode()).hexdigest()[:32]


def sidecar(path: Path, key: str) -> Path:
    return path.parent / f"{path.stem}.{key}.npy"


def embed_pack(path: Path, embed, encoder_id: str) -> Path:
    """Write the pack's embeddings beside it (float16) and remove sidecars of older packs or encoders."""
    out = sidecar(path, pack_key(path, encoder_id))
    for old in path.parent.glob(f"{path.stem}.*.npy"):
        if old != out:
            old.unlink()
    vectors = np.asarray(embed([key_text(r) for r in read_pack(path)]), dtype=np.float16)
    with out.open("wb") as f:
        np.save(f, vectors)
    return out


def shots(found: list[tuple[float, dict]]) -> list[dict]:
    """Retrieved pairs as earlier chat turns, least similar first so the closest sits next to the question."""
    out: list[dict] = []
    for _, rec in reversed(found):
        out += [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec["response"]}]
    return out


def with_passages(question: str, found: list[tuple[float, dict]]) -> str:
    """The question with the retrieved passages before it in its own turn, each under its source, the closest next
    to the question. A 270M model uses a passage read there better than one shown as an earlier answer (dev, python,
    rust and system, documentation alone: hit 0.355 -> 0.449, recall 0.129 -> 0.178, similarity the same)."""
    told = "\n\n".join(f"From {rec['source']}:\n{rec['passage']}" for _, rec in reversed(found))
    return f"{told}\n\nUsing that, answer: {question}"


def citation(answer: str, sources: list[str]) -> str:
    """What goes after an answer to cite the passages it was given: ` [python docs: os.path]` ("" for an empty
    answer, or one that cites them already)."""
    tags = " ".join(f"[{s}]" for s in dict.fromkeys(sources) if f"[{s}]" not in answer)
    return f" {tags}" if tags and answer.strip() else ""


# ---------------------------------------------------------------------------------------------------
# Knowledge packages: a `knowledge.toml` beside a pack of passages, found under the models directories

KNOWLEDGE_TOML = "knowledge.toml"


@dataclass(frozen=True)
class DocPack:
    """A knowledge package's settings: the pack, the experts' domain it serves (* = every expert), how many
    passages go before a question and the least similarity for one to be shown."""
    path: Path
    domain: str
    passages: int = 1
    min_similarity: float = 0.5

    def serves(self, domain: str | None) -> bool:
        return self.domain == "*" or self.domain == domain


KNOWLEDGE_SCHEMA = {"knowledge": {
    "domain": Key(str, "", "the experts' domain it serves; * = every expert"),
    "pack": Key(str, "", "the pack file beside knowledge.toml"),
    "passages": Key(int, 1, "how many passages go before the question", range=(0, 8)),
    "min_similarity": Key(float, 0.5, "least router-encoder cosine for a passage to be shown", range=(-1.0, 1.0)),
    "words": Key(int, 120, "the passage size it was built with"),
    "sources": Key(list, [], "what it was built from"),
}}


def load_doc_pack(toml_path: Path) -> DocPack:
    """One knowledge.toml, checked against KNOWLEDGE_SCHEMA; a bad one is a one-line error naming the file, the line
    and the key."""
    data, text = read_toml(toml_path)
    check_sections(toml_path, text, data, KNOWLEDGE_SCHEMA)
    sec = validate_section(toml_path, text, "knowledge", data.get("knowledge", {}), KNOWLEDGE_SCHEMA["knowledge"])
    if not sec["domain"] or not sec["pack"]:
        raise HublabError(f"{toml_path}: needs [knowledge] domain and pack; rebuild it with `hublab knowledge build`")
    if sec["pack"] in (".", "..") or "/" in sec["pack"] or "\\" in sec["pack"]:
        raise HublabError(f"{toml_path}: [knowledge] pack {sec['pack']!r} is not a file name; name the pack file "
                          "beside knowledge.toml")
    return DocPack(toml_path.parent / sec["pack"], sec["domain"], sec["passages"], sec["min_similarity"])


def find_doc_packs(dirs: list[Path]) -> tuple[list[DocPack], list[str]]:
    """Every knowledge package under the models directories (dot folders, package staging, skipped), and the
    one-line errors of the broken ones (the others still load)."""
    found, errors = [], []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for toml_path in sorted(d.rglob(KNOWLEDGE_TOML)):
            if any(p.startswith(".") for p in toml_path.relative_to(d).parts[:-1]):
                continue
            try:
                found.append(load_doc_pack(toml_path))
            except HublabError as exc:
                errors.append(str(exc))
    return found, errors
