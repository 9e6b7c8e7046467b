"""An expert's knowledge pack: question/answer pairs it retrieves and shows the model before the question.

A 270M model knows little; shown two close, correct answers it answers in their voice and often with their
facts. The pack is a JSONL of {"question", "response"} records (`[expert] knowledge`), embedded once with
the router's encoder (the same MiniLM that routes, so no second model on the device). Embeddings are cached
under the state dir keyed by the pack's and the encoder's hashes: a changed pack or a new router gives a
new cache, never a stale one. Retrieval is one matrix-vector product.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embcache import cached_embeddings
from ..errors import HublabError
from ..pkg.manifest import sha256_file
from ..engine.memory import drop_file_cache


def read_pack(path: Path) -> list[dict]:
    """The pack's records; a bad line is a one-line error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise HublabError(f"{path}: knowledge pack not found; fix [expert] knowledge or reinstall the expert") from None
    except UnicodeDecodeError:
        raise HublabError(f"{path}: knowledge pack is not UTF-8 text; rewrite it as UTF-8 JSONL") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise HublabError(f"{path}:{n}: not a JSON object; each line is "
                              '{"question": ..., "response": ...}') from None
        if not (isinstance(rec, dict) and isinstance(rec.get("question"), str) and isinstance(rec.get("response"), str)
                and rec["question"].strip() and rec["response"].strip()):
            raise HublabError(f"{path}:{n}: needs non-empty string fields question and response")
        out.append({"question": rec["question"].strip(), "response": rec["response"].strip()})
    return out


@dataclass
class Pack:
    path: Path
    records: list[dict]
    vectors: np.ndarray    # (n, dim) unit rows, float32

    def nearest(self, query_vec: np.ndarray, k: int, min_similarity: float) -> list[tuple[float, dict]]:
        """Up to k records most similar to the query, best first, at least `min_similarity`."""
        if k <= 0 or not len(self.records):
            return []
        sims = self.vectors @ query_vec.astype(np.float32)
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
                vectors = np.load(side, allow_pickle=False).astype(np.float32)
            except (OSError, ValueError):
                vectors = None  # a torn or foreign file: embed instead
            if vectors is not None and vectors.shape[0] != len(records):
                vectors = None
        if vectors is None:
            vectors = cached_embeddings("knowledge", [r["question"] for r in records], self.encoder_id, self.embed)
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
    vectors = np.asarray(embed([r["question"] for r in read_pack(path)]), dtype=np.float16)
    with out.open("wb") as f:
        np.save(f, vectors)
    return out


def shots(found: list[tuple[float, dict]]) -> list[dict]:
    """Retrieved pairs as earlier chat turns, least similar first so the closest sits next to the question."""
    out: list[dict] = []
    for _, rec in reversed(found):
        out += [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec["response"]}]
    return out
