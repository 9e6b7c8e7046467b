"""A base split across RPC workers runs in a process of its own, running hublab's own engine.

ggml-rpc aborts the process that holds the model when a worker goes away (`Remote RPC server crashed or returned
malformed response`), so that process is a child: the Runtime keeps a `SplitBase` where a `LoadedBase` would be,
and the child, a Runtime of its own with the same system settings and profile, holds the llama.cpp model with the
workers as its devices (rpc.py), its adapters, its per-expert prefix cache and the decode loop: the same code as
an unsplit base, so the same tokens. When a worker goes away only the child dies: the answer in progress ends
with a one-line error, everything else the Runtime holds keeps serving, and the next request for that base checks
the workers again and starts a new child.

Parent and child talk over a socketpair with multiprocessing's Connection (pickled tuples): a request, then its
reply; an answer streams as ("piece", text) ... ("done", result). The child reads on a thread of its own, so a
"cancel" reaches it while it decodes. The router, knowledge packs and synthesis stay in the parent.

    python -m hublab.runtime.engine.split FD       # started by SplitBase.start, never by hand
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

from ..errors import HublabError
from .llamacpp import require, rpc_protocol
from .rpc import RpcError, check_worker, hello
from .session import GenerationResult
from .threads import ThreadPolicy

START_TIMEOUT = 600.0  # seconds a child may take to load a base over the network (an 8B Q4 over gigabit: ~40 s)
# seconds an answer under way may go without a word from the child: a worker whose link stalls without closing
# (a cable pulled, a board hung) blocks ggml-rpc's read until TCP gives up, many minutes later
STALL_S = 60.0


class SplitBase:
    """What the Runtime holds for a split base: the child that runs it, and the facts the Runtime reads of a
    loaded base (name, memory, adapters, busy, last_used, the lock answers take)."""

    def __init__(self, name: str, config, n_ctx: int, estimate, proc: subprocess.Popen, conn: Connection,
                 stderr, policy: ThreadPolicy):
        self.name, self.config, self.n_ctx, self.estimate = name, config, n_ctx, estimate
        self.proc, self.conn, self._stderr = proc, conn, stderr
        self.adapters: dict[str, tuple[None, float, int]] = {}
        self.active: str | None = None
        self.lock = threading.RLock()
        self.last_used = time.monotonic()
        self.busy = 0
        self.policy = policy
        self.states: dict = {}
        self.compute_reserved = 0
        self.chat_format = "plain"
        self.dead: str | None = None   # why the child is gone (a worker went away), None while it serves
        self._io = threading.Lock()

    @property
    def workers(self) -> tuple[str, ...]:
        return self.config.rpc

    @property
    def memory(self) -> int:
        return self.estimate.total + sum(b for _, _, b in self.adapters.values())

    # -- start and stop -------------------------------------------------------------------------------------

    @classmethod
    def start(cls, rt, plan) -> "SplitBase":
        """Check every worker (reachable, same protocol version), start the child and load the base there."""
        owner = plan.owner
        ours = rpc_protocol()
        for endpoint in owner.rpc:
            check_worker(endpoint, ours)
        require("rpc-client")
        mine, theirs = socket.socketpair()
        stderr = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "hublab.runtime.engine.split", str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, start_new_session=True)  # a ^C in the shell is the parent's
        finally:
            theirs.close()
        conn = Connection(mine.detach())
        base = cls(owner.name, owner, plan.n_ctx, plan.base, proc, conn, stderr,
                   ThreadPolicy(rt.threads, fixed=rt.fixed_threads, load=rt.cpu_load))
        try:
            base._call("init", {"system": rt.system, "profile": rt.profile,
                                "threads": rt.threads if rt.fixed_threads else 0}, timeout=60)
            info = base._call("load", owner.name, timeout=START_TIMEOUT)
        except BaseException:
            base.close()
            raise
        base.compute_reserved, base.chat_format = info["compute_reserved"], info["chat_format"]
        return base

    def close(self) -> None:
        """Stop the child (the workers free what it held when its connections close)."""
        if self.proc.poll() is None:
            try:
                with self._io:
                    self.conn.send(("close",))
                self.proc.wait(10)
            except (OSError, EOFError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.conn.close()
        self._stderr.close()

    # -- requests -------------------------------------------------------------------------------------------

    def _call(self, *msg, timeout: float | None = None):
        with self._io:
            self._send(msg)
            reply = self._recv(timeout)
        return self._value(reply)

    def _send(self, msg: tuple) -> None:
        if self.dead:
            raise RpcError(self.dead)
        try:
            self.conn.send(msg)
        except OSError:
            raise self._died() from None

    def _recv(self, timeout: float | None = None):
        try:
            if timeout is not None and not self.conn.poll(timeout):
                self.proc.kill()
                raise self._died(f"no answer within {timeout:g} s")
            return self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None

    @staticmethod
    def _value(reply):
        if reply[0] == "error":
            raise _error(reply[1], reply[2])
        return reply[1]

    def _died(self, why: str = "") -> RpcError:
        """The child is gone: say which worker went away and what llama.cpp said, in one line."""
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        said = why or _last_words(self._stderr) or _exit_text(self.proc.returncode)
        gone = []
        for endpoint in self.workers:
            try:
                hello(endpoint, timeout=2.0)
            except RpcError:
                gone.append(endpoint)
        who = (f"RPC worker {', '.join(gone)} went away" if gone else "its process stopped")
        self.dead = (f"split base {self.name}: {who} ({said}); this answer is lost, other models keep serving and "
                     f"{self.name} loads again on the next request once its workers answer")
        return RpcError(self.dead)

    def use(self, expert: str | None) -> None:
        """Which expert the next answer is for (the child applies its adapter when it decodes)."""
        self.active = expert if expert in self.adapters else None

    def forget(self, expert: str | None) -> None:
        pass  # the child's own LoadedBase keeps (and forgets) the prefix states

    def free_batch(self) -> None:
        pass

    def load_adapter(self, expert: str, scale: float, size: int) -> None:
        self._call("load", expert, timeout=START_TIMEOUT)
        self.adapters[expert] = (None, scale, size)

    def unload_adapter(self, expert: str) -> None:
        self._call("unload", expert)
        self.adapters.pop(expert, None)

    def prompt_tokens(self, expert: str, prompt, raw: bool, system_prompt: str, special: bool
                      ) -> tuple[list[int], list[str]]:
        return self._call("tokens", expert, prompt, raw, system_prompt, special)

    def rss(self) -> int:
        return self._call("rss")

    def set_threads(self, threads: int) -> None:
        """`ai config threads` for the process that decodes (0: its own choice, as here)."""
        self._call("threads", threads)

    def clear_kv(self) -> None:
        """Drop the live KV cache in the child (the next answer reads its whole prompt), as LoadedBase.clear_kv."""
        self._call("clear")

    def stream(self, op: str, target, prompt, kwargs: dict, cancel: threading.Event | None,
               done) -> Iterator[str]:
        """Run one answer in the child (op "stream" for an expert, "mixture" for weights over experts), yielding
        its text; `done(result)` gets the GenerationResult. A child that dies ends it with an RpcError."""
        with self._io:
            self._send((op, target, prompt, kwargs))
            finished = cancelled = False
            heard, spoke = time.monotonic(), False
            try:
                while True:
                    if cancel is not None and cancel.is_set() and not cancelled:
                        self._send(("cancel",))
                        cancelled = True
                    try:
                        ready = self.conn.poll(0.5 if cancel is None or cancelled else 0.05)
                    except (EOFError, OSError):
                        raise self._died() from None
                    if not ready:
                        # before the first piece the prompt may be long (read over the network): allow a load's time
                        if time.monotonic() - heard > (STALL_S if spoke else START_TIMEOUT):
                            self.proc.kill()
                            raise self._died(f"no word for {STALL_S if spoke else START_TIMEOUT:g} s mid-answer: "
                                             "a worker's link stalled")
                        continue
                    reply = self._recv()
                    heard, spoke = time.monotonic(), True
                    if reply[0] == "piece":
                        yield reply[1]
                    elif reply[0] == "done":
                        finished = True
                        done(GenerationResult(**reply[1]))
                        return
                    else:
                        finished = True
                        raise _error(reply[1], reply[2])
            finally:
                if not finished and not self.dead:  # the caller stopped reading: stop the child, wait for its end
                    try:
                        if not cancelled:
                            self.conn.send(("cancel",))
                        while True:
                            reply = self._recv(60)
                            if reply[0] in ("done", "error"):
                                break
                    except RpcError:
                        pass


def _error(kind: str, message: str) -> HublabError:
    """The child's error as the parent raises it (the types callers tell apart)."""
    from .runtime import FitError
    from .session import GrammarError

    return {"FitError": FitError, "GrammarError": GrammarError, "RpcError": RpcError}.get(kind, HublabError)(message)


def _last_words(stderr) -> str:
    """llama.cpp's abort line from the child's stderr (e.g. ggml-rpc.cpp:566: Remote RPC server crashed ...)."""
    try:
        stderr.seek(0)
        lines = stderr.read()[-8192:].decode("utf-8", "replace").splitlines()
    except (OSError, ValueError):
        return ""
    said = [re.sub(r"\S*/(\S+\.cpp:\d+)", r"\1", line.strip()) for line in lines
            if ".cpp:" in line or "error" in line.lower()]
    return said[-1][:200] if said else ""


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"the process got {signal.Signals(-code).name}"
        except ValueError:
            return f"the process got signal {-code}"
    return f"the process exited with {code}"


# -- the child ------------------------------------------------------------------------------------------------

def child(fd: int) -> int:
    """Serve one split base for the parent on connection `fd` until it says close or goes away."""
    import queue
    from dataclasses import asdict

    from .runtime import Runtime

    conn = Connection(fd)
    inbox: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def read() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the parent is gone: so is the reason to hold the model
            if msg[0] == "cancel":
                cancel.set()
            else:
                inbox.put(msg)

    threading.Thread(target=read, daemon=True, name="split-reader").start()
    rt = None
    while True:
        op, *args = inbox.get()
        try:
            if op == "close":
                if rt is not None:
                    rt.close()
                return 0
            if op == "init":
                settings = args[0]
                rt = Runtime(system=settings["system"], profile=settings["profile"], threads=settings["threads"],
                             keep_alive=-1)
                rt.rpc_host = True  # the parent routes and retrieves knowledge; this process decodes
                conn.send(("ok", os.getpid()))
            elif op == "load":
                base = rt.load(args[0])
                conn.send(("ok", {"compute_reserved": base.compute_reserved, "chat_format": base.chat_format}))
            elif op == "unload":
                conn.send(("ok", rt.unload(args[0])))
            elif op == "tokens":
                name, prompt, raw, system_prompt, special = args
                cfg = rt.config(name)
                base = rt.load(cfg.base or cfg.name)
                with base.lock:
                    conn.send(("ok", rt.prompt_tokens(base, cfg, prompt, raw, system_prompt, special)))
            elif op == "threads":
                rt.set_threads(args[0])
                conn.send(("ok", rt.threads))
            elif op == "clear":
                for base in rt._loaded.values():
                    with base.lock:
                        base.clear_kv()
                conn.send(("ok", None))
            elif op == "rss":
                import psutil

                conn.send(("ok", psutil.Process().memory_info().rss))
            elif op in ("stream", "mixture"):
                target, prompt, kwargs = args
                cancel.clear()
                if op == "stream":
                    gen = rt.stream(target, prompt, cancel=cancel, **kwargs)
                else:
                    gen = rt.mixture_stream(target, prompt, cancel=cancel, **kwargs)
                for piece in gen:
                    conn.send(("piece", piece))
                conn.send(("done", asdict(gen.result)))
            else:
                conn.send(("error", "HublabError", f"unknown request {op!r}"))
        except HublabError as exc:
            conn.send(("error", type(exc).__name__, str(exc)))
        except Exception as exc:  # noqa: BLE001  (one line to the parent, never a traceback lost in a pipe)
            conn.send(("error", "HublabError", f"{exc.__class__.__name__}: {exc}"))


if __name__ == "__main__":
    sys.exit(child(int(sys.argv[1])))
