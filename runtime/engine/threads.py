"""How many threads llama.cpp gets: the count that measured fastest on this board lately.

llama.cpp splits every matrix product evenly over its threads and waits, spinning, for the slowest. When
another process keeps a core busy, the thread that shares that core drags every token down: with one of two
cores busy, 2 threads gave 11.4 tokens/s where 1 gave 20.4. A Pi also runs other things, so unless threads
are set explicitly the runtime times its own decode steps, a window of tokens at a time, keeps a smoothed
seconds-per-token for each thread count it tried, runs the fastest, and now and then tries a neighbouring
count again (another process may have started or stopped since). Changing the count is free
(llama_set_n_threads), but a trial at a count that collapses costs seconds per token, so:

- before each answer it looks at /proc/stat (`CpuLoad`): CPU time other processes took since the last look
  (this process's own time subtracted). With k of its CPUs busy elsewhere it runs at most the others' worth
  of threads, and does not try more until they are free: a one-shot `hublab run` on a busy board starts at
  the right count, and a question after a pause does not spend its first tokens on a collapsing trial;
- a trial window is abandoned at the first step slower than ABANDON times the best count's step;
- a count above the best that lost its trial waits twice as long before its next one (up to MAX_BACKOFF).
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WINDOW = 8          # decode steps per measurement
RETRY_S = 10.0      # a neighbouring count is tried again when its measurement is older than this
SMOOTH = 0.5        # weight of the newest window in the smoothed seconds-per-token
WORSE = 1.25        # the count in use measuring this much slower than when last chosen: retry neighbours now
ABANDON = 2.0       # a trial step this many times slower than the best count's step ends the trial at once
MAX_BACKOFF = 8     # a count above the best that keeps losing is retried at most every MAX_BACKOFF x RETRY_S
MIN_LOOK_S = 0.2    # /proc/stat ticks are 10 ms: a shorter interval says nothing
SPARE = 0.3         # CPUs free enough to run a thread: floor(free + SPARE), so 1.8 free CPUs run 2, 1.5 run 1


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a cpuset or taskset), not every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_ticks(stat: str, cpus: set[int]) -> int | None:
    """Busy clock ticks (all but idle and iowait) of `cpus`, summed, from a /proc/stat text."""
    total, found = 0, False
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            ticks = [int(x) for x in rest.split()]
        except ValueError:
            continue
        if cpu in cpus and len(ticks) >= 5:
            total += sum(ticks[:8]) - ticks[3] - ticks[4]  # user nice system idle iowait irq softirq steal
            found = True
    return total if found else None


class CpuLoad:
    """How many of this process's CPUs other processes left free since the last look."""

    def __init__(self, cpus: set[int] | None = None, read: Callable[[], str] | None = None,
                 own: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic,
                 hz: int | None = None):
        if cpus is None:
            try:
                cpus = set(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cpus = set(range(os.cpu_count() or 1))
        self.cpus = cpus
        self.read = read or (lambda: Path("/proc/stat").read_text())
        self.own, self.clock = own, clock
        self.hz = hz or os.sysconf("SC_CLK_TCK")
        self._lock = threading.Lock()
        self._last = self._sample()

    def _sample(self) -> tuple[int | None, float, float]:
        try:
            busy = _busy_ticks(self.read(), self.cpus)
        except OSError:
            busy = None
        return busy, self.own(), self.clock()

    def free(self) -> float | None:
        """CPUs (of ours) free of other processes' work since the last call; None when it cannot tell."""
        with self._lock:
            new = self._sample()
            old = self._last
            if new[2] - old[2] < MIN_LOOK_S:
                return None  # too soon: keep the older look for the next call
            self._last = new
        if new[0] is None or old[0] is None:
            return None
        seconds = new[2] - old[2]
        others = (new[0] - old[0]) / self.hz - (new[1] - old[1])
        return max(0.0, len(self.cpus) - max(0.0, others) / seconds)


@dataclass
class _Seen:
    per_token: float   # smoothed seconds per decode step
    at: float          # when last measured (the policy's clock)


class ThreadPolicy:
    """Chooses the thread count for each window of decode steps. `fixed` (threads set in system.toml or on the
    command line) always gives `most`."""

    def __init__(self, most: int, fixed: bool = False, clock=time.perf_counter, load: CpuLoad | None = None):
        self.most = max(1, most)
        self.fixed = fixed
        self.clock = clock
        self.load = load
        self.cap = self.most                   # the most threads the other processes leave room for now
        self.seen: dict[int, _Seen] = {}
        self._chosen_at: float | None = None   # per_token of the current best when it was chosen
        self._backoff: dict[int, int] = {}     # count -> multiple of RETRY_S before its next trial
        self._lock = threading.Lock()

    def look(self) -> int:
        """Before an answer: the room other processes leave (CpuLoad), as the cap on the thread count."""
        free = self.load.free() if self.load is not None and not self.fixed else None
        if free is not None:
            self.cap = max(1, min(self.most, math.floor(free + SPARE)))
        return self.cap

    def best(self) -> int:
        """The fastest count measured so far within the cap (the most threads the cap allows before anything
        was measured)."""
        seen = {n: s for n, s in self.seen.items() if n <= self.cap}
        if not seen:
            return self.cap
        return min(seen, key=lambda n: (seen[n].per_token, -n))

    def choose(self) -> int:
        """The thread count for the next window: the best, or a neighbour of it that is due a trial."""
        if self.fixed or self.most == 1:
            return self.most
        with self._lock:
            best = self.best()
            if best not in self.seen:
                return best
            now = self.clock()
            slower = self._chosen_at is not None and self.seen[best].per_token > WORSE * self._chosen_at
            for n in (best - 1, best + 1):
                wait = RETRY_S * self._backoff.get(n, 1)
                if 1 <= n <= self.cap and (n not in self.seen or slower or now - self.seen[n].at > wait):
                    return n
            return best

    def observe(self, threads: int, per_token: float) -> None:
        """One window ran with `threads` threads at `per_token` seconds per decode step."""
        if self.fixed or per_token <= 0:
            return
        with self._lock:
            old, now = self.seen.get(threads), self.clock()
            fresh = old is None or now - old.at > RETRY_S   # a stale measurement says nothing about now
            value = per_token if fresh else SMOOTH * per_token + (1 - SMOOTH) * old.per_token
            before = self.best()
            self.seen[threads] = _Seen(value, now)
            after = self.best()
            if after != before or threads != after or self._chosen_at is None:
                self._chosen_at = self.seen[after].per_token
            if threads > after:  # a count above the best lost: slower to try it again
                self._backoff[threads] = min(MAX_BACKOFF, 2 * self._backoff.get(threads, 1))
            elif threads == after:
                self._backoff.pop(threads, None)

    def _bar(self, n: int) -> float | None:
        """A step slower than this ends the window at count `n` at once (n is on trial against a measured best)."""
        best = self.best()
        return ABANDON * self.seen[best].per_token if n != best and best in self.seen else None

    def paced(self, tokens, apply):
        """Wrap a token iterator: `apply(n)` sets the thread count before the first token and after each
        window; the time between tokens (decode steps, the first one's prefill excluded) is what is measured."""
        self.look()
        n = self.choose()
        apply(n)
        it = iter(tokens)
        try:
            first = next(it)
        except StopIteration:
            return
        yield first
        if self.fixed or self.most == 1:
            yield from it
            return
        bar = self._bar(n)
        count, t0 = 0, self.clock()
        last = t0
        for token in it:
            yield token
            count += 1
            now = self.clock()
            abandon = bar is not None and now - last > bar
            last = now
            if count == WINDOW or abandon:
                self.observe(n, (now - t0) / count)
                new = self.choose()
                if new != n:
                    apply(new)
                    n = new
                bar = self._bar(n)
                count, t0 = 0, self.clock()
                last = t0
