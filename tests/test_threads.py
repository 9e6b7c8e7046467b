"""The thread policy on a busy board, from recorded /proc/stat samples and a fake clock (no timing of this host)."""
from __future__ import annotations

import pytest

from hublab.runtime.engine.threads import ABANDON, RETRY_S, WINDOW, CpuLoad, ThreadPolicy, _busy_ticks

# /proc/stat as read off the 2-core build box (first lines): user nice system idle iowait irq softirq steal ...
STAT = """cpu  126780 53409 18188 20914 427 0 231 149 0 0
cpu0 59560 27904 8214 14099 133 0 26 77 0 0
cpu1 67219 25505 9973 6814 294 0 205 72 0 0
intr 1234 0 0
ctxt 5678
"""


def stat(cpu0_busy: int, cpu1_busy: int, idle: int = 1000) -> str:
    """A /proc/stat text whose cpuN lines hold `cpuN_busy` user ticks."""
    return (f"cpu  {cpu0_busy + cpu1_busy} 0 0 {2 * idle} 0 0 0 0 0 0\n"
            f"cpu0 {cpu0_busy} 0 0 {idle} 0 0 0 0 0 0\ncpu1 {cpu1_busy} 0 0 {idle} 0 0 0 0 0 0\n")


class Feed:
    """Successive values for CpuLoad's read/own/clock."""

    def __init__(self, *values):
        self.values = list(values)

    def __call__(self):
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def load(texts, own, clock) -> CpuLoad:
    return CpuLoad(cpus={0, 1}, read=Feed(*texts), own=Feed(*own), clock=Feed(*clock), hz=100)


def test_busy_ticks_read_the_recorded_sample():
    assert _busy_ticks(STAT, {0}) == 59560 + 27904 + 8214 + 26 + 77
    assert _busy_ticks(STAT, {0, 1}) == _busy_ticks(STAT, {0}) + 67219 + 25505 + 9973 + 205 + 72
    assert _busy_ticks(STAT, {7}) is None and _busy_ticks("garbage\n", {0}) is None


def test_cpu_load_sees_what_others_take_and_not_our_own_time():
    # one second: another process kept cpu1 busy, we were idle -> one CPU free
    assert load([stat(0, 0), stat(0, 100)], [0.0, 0.0], [0.0, 1.0]).free() == pytest.approx(1.0)
    # both cores busy elsewhere -> none free
    assert load([stat(0, 0), stat(100, 100)], [0.0, 0.0], [0.0, 1.0]).free() == pytest.approx(0.0)
    # the busy core was us (model load, a generation): both free
    assert load([stat(0, 0), stat(100, 0)], [0.0, 1.0], [0.0, 1.0]).free() == pytest.approx(2.0)
    # too soon to tell
    assert load([stat(0, 0), stat(0, 5)], [0.0, 0.0], [0.0, 0.05]).free() is None
    # an unreadable /proc/stat: no opinion
    assert load(["", ""], [0.0, 0.0], [0.0, 1.0]).free() is None


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Room:
    """A CpuLoad stand-in that reports `free` CPUs."""

    def __init__(self, free):
        self.value = free

    def free(self):
        return self.value


def test_a_busy_core_caps_the_count_before_anything_is_measured():
    clock, room = Clock(), Room(1.0)
    p = ThreadPolicy(2, clock=clock, load=room)
    assert p.look() == 1 and p.choose() == 1        # a one-shot run starts on the free core, no trial at 2
    p.observe(1, 0.05)
    clock.t += 3 * RETRY_S                           # a pause at the shell: the other process still runs
    assert p.look() == 1 and p.choose() == 1
    room.value = 1.6                                 # half a core more is not room for a second thread
    assert p.look() == 1
    room.value = 2.0                                 # the other process ended: 2 may be tried again
    assert p.look() == 2 and p.choose() == 2
    room.value = None                                # no new look: the last cap stays
    assert p.look() == 2


def test_a_trial_ends_at_its_first_slow_step():
    clock = Clock()
    p = ThreadPolicy(2, clock=clock)
    p.observe(2, 0.2)
    p.observe(1, 0.05)                               # 1 is best; 2 is stale after RETRY_S
    clock.t += RETRY_S + 1
    applied = []

    def tokens():
        for i in range(WINDOW + 4):
            yield i
            clock.t += 0.05 if applied[-1] == 1 else 0.05 * ABANDON * 3  # 2 threads collapse

    out = list(p.paced(tokens(), applied.append))
    assert out == list(range(WINDOW + 4))
    assert applied == [2, 1]                         # one slow step at 2, then straight back to 1


def test_a_count_that_lost_waits_longer_before_its_next_trial():
    clock = Clock()
    p = ThreadPolicy(2, clock=clock)
    p.observe(2, 0.2)
    p.observe(1, 0.05)
    clock.t += RETRY_S + 1
    assert p.choose() == 2
    p.observe(2, 0.2)                                # lost again: backoff doubles
    p.observe(1, 0.05)
    clock.t += RETRY_S + 1
    assert p.choose() == 1                           # not yet: twice RETRY_S now
    clock.t += RETRY_S
    assert p.choose() == 2


def test_runtime_policies_look_at_the_board(tiny_models_dir):
    from hublab.runtime.engine.runtime import Runtime

    with Runtime(models_dir=tiny_models_dir, profile="host", threads=0) as rt:
        rt.generate("tiny", "the python model", raw=True, max_tokens=2)
        policy = rt._loaded["tiny"].policy
        assert policy.load is rt.cpu_load and 1 <= policy.cap <= rt.threads
