"""Fit and expiry decisions on plain entries (no llama.cpp): which idle bases make room, and which expired."""
from __future__ import annotations

from dataclasses import dataclass

from hublab.runtime.engine.scheduler import expired, victims

MB = 1 << 20


@dataclass
class Base:
    name: str
    memory: int
    last_used: float
    busy: int = 0


def test_least_recently_used_idle_bases_make_room_and_no_more():
    loaded = [Base("a", 100 * MB, last_used=3.0), Base("b", 100 * MB, last_used=1.0), Base("c", 100 * MB, 2.0)]
    assert victims(loaded, "x", 50 * MB, 400 * MB) == []             # fits as is
    assert victims(loaded, "x", 150 * MB, 400 * MB) == ["b"]          # the oldest first
    assert victims(loaded, "x", 250 * MB, 400 * MB) == ["b", "c"]
    assert victims(loaded, "b", 250 * MB, 400 * MB) == ["c", "a"]     # never the base about to be used


def test_busy_bases_stay_and_a_plan_that_cannot_fit_evicts_nothing():
    loaded = [Base("a", 100 * MB, 1.0, busy=1), Base("b", 100 * MB, 2.0)]
    assert victims(loaded, "x", 250 * MB, 400 * MB) == ["b"]
    assert victims(loaded, "x", 350 * MB, 400 * MB) is None           # refused before anything is unloaded


def test_keep_alive_expiry():
    loaded = [Base("a", MB, last_used=0.0), Base("b", MB, last_used=9.0), Base("c", MB, 0.0, busy=1)]
    assert expired(loaded, now=10.0, keep_alive=5.0) == ["a"]
    assert expired(loaded, now=10.0, keep_alive=-1) == [] and expired(loaded, now=10.0, keep_alive=0) == []
