"""What is loaded, decided apart from running it (as Ollama keeps server/sched.go apart from llm/): the load plan
of a model read off its GGUF headers once, which idle models make room for it (least recently used first), and
which have outlived keep_alive. Nothing here touches llama.cpp, so these decisions are tested with plain entries.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..config import ModelConfig
from .memory import GGUFInfo, MemoryEstimate


@dataclass(frozen=True)
class LoadPlan:
    """What serving one model or expert takes: the base GGUF that runs it, read once, at the context it gets,
    and the adapter on it for an adapter expert."""
    config: ModelConfig            # the model or expert asked for
    owner: ModelConfig             # the config whose GGUF runs it (its base, for an adapter expert)
    path: Path
    info: GGUFInfo
    n_ctx: int
    base: MemoryEstimate           # the base at n_ctx
    adapter: Path | None = None
    adapter_info: GGUFInfo | None = None

    @property
    def estimate(self) -> MemoryEstimate:
        """Memory this model costs on its own: the base with its context, plus the adapter's tensors."""
        extra = self.adapter_info.tensor_bytes if self.adapter_info else 0
        return MemoryEstimate(self.base.weights + extra, self.base.kv_cache, self.base.compute)


class Resident(Protocol):
    """A loaded base as the scheduler sees it."""
    name: str
    busy: int
    last_used: float

    @property
    def memory(self) -> int: ...


def victims(loaded: Iterable[Resident], keep: str, need: int, budget: int) -> list[str] | None:
    """The idle bases to unload, least recently used first, so that `need` more bytes fit in `budget` (never
    `keep`, the base about to be used, nor a busy one); None when even all of them leave too little room."""
    resident = list(loaded)
    used = sum(b.memory for b in resident)
    out = []
    for b in sorted((b for b in resident if b.name != keep and not b.busy), key=lambda b: b.last_used):
        if used + need <= budget:
            break
        out.append(b.name)
        used -= b.memory
    return out if used + need <= budget else None


def expired(loaded: Iterable[Resident], now: float, keep_alive: float) -> list[str]:
    """Idle bases unused for keep_alive seconds (0: unloaded right after use by whoever used them; negative:
    never)."""
    if keep_alive <= 0:
        return []
    return [b.name for b in loaded if not b.busy and now - b.last_used >= keep_alive]
