"""Sentence embeddings computed once with the router's encoder and cached on disk.

Knowledge packs and expert examples both embed a list of texts with the router's encoder and want the
result across restarts. A cache file is keyed by a hash of the texts and the encoder's hash (sha256 of
model.onnx), and holds both keys again, so a new router or changed texts give a new file and a foreign or
torn file is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..paths import cache_home


def cache_root() -> Path:
    """$HUBLAB_HOME/cache, else $XDG_CACHE_HOME/hublab (~/.cache/hublab)."""
    return cache_home()


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 over the texts in order (NUL-separated, so ["ab"] and ["a", "b"] differ)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def cached_embeddings(kind: str, texts: Sequence[str], encoder_id: str,
                      embed: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
    """(len(texts), dim) float32 unit rows: from <cache_root>/<kind>/<key>.npz, else embedded and stored."""
    content = texts_hash(texts)
    key = hashlib.sha256(f"{content}:{encoder_id}".encode()).hexdigest()[:32]
    path = cache_root() / kind / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                ok = (str(data["encoder"]) == encoder_id and str(data["texts"]) == content
                      and data["vectors"].shape[0] == len(texts))
                if ok:
                    return data["vectors"].astype(np.float32)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # torn, foreign or from another encoder: rebuilt below
    # Rounded like the stored copy, so the first run scores exactly as every later one.
    vectors = np.asarray(embed(texts), dtype=np.float32).reshape(len(texts), -1).astype(np.float16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{key}.{os.getpid()}.tmp.npz")
        np.savez(tmp, vectors=vectors, encoder=np.array(encoder_id), texts=np.array(content))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the embedding again next start
    return vectors.astype(np.float32)
