"""One generation at a time per loaded base, a bounded queue before it, and cancellation.

llama.cpp contexts are not thread-safe, so the agent runs one generation per base: a request waits for
its bases in a queue of at most `[agent] queue_size` (a full queue is `QueueFull`, which the agent answers
503 with Retry-After), and a client that disconnects while queued or while generating sets its cancel
event (`watch_disconnect`).
"""
from __future__ import annotations

import contextlib
import select
import socket
import threading

from ..errors import HublabError


class QueueFull(HublabError):
    """Every queue slot is taken."""


class Cancelled(Exception):
    """The client went away before its turn came."""


class Gate:
    """One generation at a time per base; at most `size` requests wait. Locks are taken in name order,
    so a request that needs two bases cannot deadlock against another."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._bases: dict[str, threading.Lock] = {}
        self.waiting = 0
        self.running = 0

    @contextlib.contextmanager
    def enter(self, bases: list[str], cancel: threading.Event):
        with self._lock:
            if self.waiting >= self.size:
                raise QueueFull(f"the agent's queue is full ({self.size} waiting); retry shortly")
            self.waiting += 1
            locks = [self._bases.setdefault(b, threading.Lock()) for b in sorted(set(bases))]
        held: list[threading.Lock] = []
        try:
            for lock in locks:
                # poll so that a client who leaves while queued gives up its place
                while not lock.acquire(timeout=0.05):
                    if cancel.is_set():
                        raise Cancelled
                held.append(lock)
        except BaseException:
            for lock in reversed(held):
                lock.release()
            with self._lock:
                self.waiting -= 1
            raise
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            yield
        finally:
            for lock in reversed(held):
                lock.release()
            with self._lock:
                self.running -= 1


@contextlib.contextmanager
def watch_disconnect(sock: socket.socket, cancel: threading.Event, interval: float = 0.1):
    """Set `cancel` when the peer closes `sock` while we work (a readable socket with nothing to read)."""
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], interval)
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    cancel.set()
                    return
            except (OSError, ValueError):
                cancel.set()
                return
            if readable:
                stop.wait(interval)  # pipelined bytes wait for us; do not spin on them

    thread = threading.Thread(target=run, name="hublab-disconnect-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

