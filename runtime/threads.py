"""How many threads llama.cpp gets: the count that measured fastest on this board lately.

llama.cpp splits every matrix product evenly over its threads and waits, spinning, for the slowest. When
another process keeps a core busy, the thread that shares that core drags every token down: with one of two
cores busy, 2 threads gave 11.4 tokens/s where 1 gave 20.4. A Pi also runs other things, so unless threads
are set explicitly the runtime times its own decode steps, a window of tokens at a time, keeps a smoothed
seconds-per-token for each thread count it tried, runs the fastest, and now and then tries a neighbouring
count again (another process may have started or stopped since). Changing the count is free
(llama_set_n_threads), so a trial costs one window of tokens at worst.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

WINDOW = 8          # decode steps per measurement
RETRY_S = 10.0      # a neighbouring count is tried again when its measurement is older than this
SMOOTH = 0.5        # weight of the newest window in the smoothed seconds-per-token
WORSE = 1.25        # the count in use measuring this much slower than when last chosen: retry neighbours now


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a cpuset or taskset), not every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class _Seen:
    per_token: float   # smoothed seconds per decode step
    at: float          # when last measured (the policy's clock)


class ThreadPolicy:
    """Chooses the thread count for each window of decode steps. `fixed` (threads set in system.toml or on the
    command line) always gives `most`."""

    def __init__(self, most: int, fixed: bool = False, clock=time.perf_counter):
        self.most = max(1, most)
        self.fixed = fixed
        self.clock = clock
        self.seen: dict[int, _Seen] = {}
        self._chosen_at: float | None = None   # per_token of the current best when it was chosen
        self._lock = threading.Lock()

    def best(self) -> int:
        """The fastest count measured so far (the most threads before anything was measured)."""
        if not self.seen:
            return self.most
        return min(self.seen, key=lambda n: (self.seen[n].per_token, -n))

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
                if 1 <= n <= self.most and (n not in self.seen or slower or now - self.seen[n].at > RETRY_S):
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

    def paced(self, tokens, apply):
        """Wrap a token iterator: `apply(n)` sets the thread count before the first token and after each
        window; the time between tokens (decode steps, the first one's prefill excluded) is what is measured."""
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
        count, t0 = 0, self.clock()
        for token in it:
            yield token
            count += 1
            if count == WINDOW:
                t1 = self.clock()
                self.observe(n, (t1 - t0) / count)
                new = self.choose()
                if new != n:
                    apply(new)
                    n = new
                count, t0 = 0, self.clock()
