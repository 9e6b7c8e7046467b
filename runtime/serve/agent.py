"""`hublab serve`: the device agent, an HTTP server over the same `Device` the shell uses in-process.

It serves three APIs over one runtime, each a module of small route handlers:
- OpenAI (runtime/serve/http_openai.py): /v1/models, /v1/chat/completions, /v1/completions
- Ollama (runtime/serve/http_ollama.py): /api/version, tags, ps, show, chat, generate, embed, embeddings, pull,
  delete, so tools written for Ollama (the `ollama` client among them) work unchanged
- hublab (runtime/serve/http_hublab.py): /hublab/* for `hublab shell --remote URL`, and /health, /metrics

llama.cpp contexts are not thread-safe, so one generation runs at a time per loaded base: a generation
waits for its base in a bounded queue (`[agent] queue_size`, runtime/serve/gate.py) and a full queue answers 503
with Retry-After. A client that disconnects cancels its generation, also while it is still queued.
A request (line, headers, body) must arrive within `request_timeout` seconds and no socket read or write
may stall longer, so a client dripping its bytes cannot hold a worker; past `max_connections` open
connections a new one is answered 503 with Retry-After at once, without a thread.
Binding a non-loopback address needs a token (`[agent] token` or $HUBLAB_TOKEN); with a token set,
every request must send `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer

from hublab import __version__

from . import http_hublab
from . import http_ollama
from . import http_openai
from .device import Device
from ..errors import HublabError
from .gate import Gate
from ..inputs import is_loopback
from .http_common import Deadlines, Request, Routes
from ..inputs import arg_int, quote

ROUTES: Routes = {**http_hublab.ROUTES, **http_openai.ROUTES, **http_ollama.ROUTES}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the listen backlog: a burst of clients waits to be accepted, not refused
    max_connections = 256
    active = 0
    _BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")

    def process_request(self, request, client_address):
        with self._count:
            busy = self.active >= self.max_connections
            if not busy:
                self.active += 1
        if busy:  # answered here, in the accept thread: a flood of connections costs no threads
            body = (b'{"error": {"message": "the agent has too many open connections; retry shortly", '
                    b'"type": "overloaded", "code": "overloaded"}}')
            try:
                request.settimeout(1.0)
                request.sendall(self._BUSY % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count:
                self.active -= 1

    def __init__(self, *args, **kw):
        self._count = threading.Lock()
        super().__init__(*args, **kw)


class Metrics:
    """Counters for /metrics; tokens and tokens/s come from the runtime's per-expert stats."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.rejected = 0
        self.cancelled = 0
        self.started = time.time()

    def count(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def bump(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def render(self, agent: "Agent") -> str:
        import psutil

        rt = agent.device.rt
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        with self._lock:
            reqs = sorted(self.requests.items())
        metric("hublab_requests_total", "counter", "HTTP requests by path and status code",
               [(f'{{path="{p}",code="{c}"}}', n) for (p, c), n in reqs])
        metric("hublab_rejected_total", "counter", "generation requests answered 503 (queue full)",
               [("", self.rejected)])
        metric("hublab_cancelled_total", "counter", "generations cancelled because the client went away",
               [("", self.cancelled)])
        stats = sorted(rt.stats.items())
        metric("hublab_generated_tokens_total", "counter", "tokens generated per expert",
               [(f'{{expert="{n}"}}', s.tokens) for n, s in stats])
        metric("hublab_prompt_tokens_total", "counter", "prompt tokens evaluated per expert",
               [(f'{{expert="{n}"}}', s.prompt_tokens) for n, s in stats])
        metric("hublab_generations_total", "counter", "generations per expert",
               [(f'{{expert="{n}"}}', s.calls) for n, s in stats])
        metric("hublab_generation_seconds_total", "counter", "seconds spent generating per expert",
               [(f'{{expert="{n}"}}', round(s.seconds, 4)) for n, s in stats])
        metric("hublab_tokens_per_second", "gauge", "generation speed of the expert's last answer",
               [(f'{{expert="{n}"}}', s.last_tokens_per_s) for n, s in stats])
        metric("hublab_queue_depth", "gauge", "generation requests waiting for their base", [("", agent.gate.waiting)])
        metric("hublab_generations_running", "gauge", "generations running now", [("", agent.gate.running)])
        metric("hublab_queue_capacity", "gauge", "requests that may wait before 503", [("", agent.gate.size)])
        metric("hublab_models_loaded", "gauge", "loaded models and adapter experts", [("", len(rt.loaded()))])
        metric("hublab_model_memory_bytes", "gauge", "estimated memory of the loaded models", [("", rt.used_memory())])
        metric("hublab_model_budget_bytes", "gauge", "the board profile's model memory budget", [("", rt.budget)])
        metric("hublab_resident_memory_bytes", "gauge", "resident memory of the agent process",
               [("", psutil.Process().memory_info().rss)])
        metric("hublab_uptime_seconds", "gauge", "seconds since the agent started",
               [("", round(time.time() - self.started, 1))])
        return "\n".join(out) + "\n"


class Agent:
    """The HTTP server over one Device. `start()` runs it in a thread (tests, bench); `serve_forever()` blocks."""

    def __init__(self, device: Device, host: str = "127.0.0.1", port: int = 8780, token: str = "",
                 queue_size: int = 8, quiet: bool = False, request_timeout: float = 20.0,
                 max_connections: int = 256):
        if not is_loopback(host) and not token:
            where = device.rt.system.path or "system.toml"
            raise HublabError(f"refusing to listen on {host} without a token; set [agent] token in {where} "
                              "or HUBLAB_TOKEN (or bind 127.0.0.1)")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or not 1 <= queue_size <= 4096:
            raise HublabError(f"queue_size must be between 1 and 4096, got {quote(queue_size)}; fix [agent] queue_size "
                              "or --queue-size")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise HublabError(f"port must be between 0 and 65535, got {quote(port)}; fix [agent] port or --port")
        self.device, self.token, self.quiet = device, token, quiet
        self.gate = Gate(queue_size)
        self.metrics = Metrics()
        self.request_timeout = request_timeout
        self.deadlines = Deadlines(request_timeout)
        self._durations: list[float] = []
        handler = type("BoundRequest", (Request,), {"agent": self, "routes": ROUTES,
                                                    "timeout": max(request_timeout, 1.0)})
        server_cls = type("_BoundServer", (_Server,), {"max_connections": max_connections})
        if ":" in host:
            server_cls = type("_Server6", (server_cls,), {"address_family": socket.AF_INET6})
        try:
            self.server = server_cls((host, port), handler)
        except (OSError, OverflowError, ValueError, UnicodeError) as exc:
            raise HublabError(f"cannot listen on {quote(host, 60)}:{port} ({getattr(exc, 'strerror', None) or exc}); "
                              "stop what uses the port, or fix --host / --port") from None
        self.host, self.port = host, self.server.server_address[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def observe(self, seconds: float) -> None:
        self._durations = (self._durations + [seconds])[-20:]

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the recent mean generation time times the queue ahead."""
        recent = self._durations or [1.0]
        return max(1, min(60, round(sum(recent) / len(recent) * (self.gate.waiting + 1))))

    def _expire_loop(self) -> None:
        # Every second: a request may set a keep_alive of a few seconds at any time, and a look at the
        # loaded bases costs nothing next to a generation.
        while not self._stop.wait(1.0):
            try:
                self.device.expire_idle()
            except HublabError as exc:
                sys.stderr.write(f"hublab agent: expire: {exc}\n")

    def _deadline_loop(self) -> None:
        while not self._stop.wait(0.2):
            self.deadlines.sweep()

    def start(self) -> "Agent":
        for target in (self.server.serve_forever, self._expire_loop, self._deadline_loop):
            t = threading.Thread(target=target, name=f"hublab-agent-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def serve_forever(self) -> None:
        self.start()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> "Agent":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser) -> None:
    parser.add_argument("--host", help="address to listen on (default: [agent] host, 127.0.0.1)")
    parser.add_argument("--port", type=arg_int(0, 65535),
                        help="TCP port (default: [agent] port, 8780; 0 = any free port)")
    parser.add_argument("--queue-size", type=arg_int(1, 4096), help="generation requests that may wait before 503 "
                                                                   "(default: [agent] queue_size)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request to stderr")


def cli(args) -> int:
    device = Device.open(profile=getattr(args, "profile", None))
    system = device.rt.system
    token = os.environ.get("HUBLAB_TOKEN") or system.token
    agent = Agent(device, host=args.host or system.host, port=system.port if args.port is None else args.port,
                  token=token, queue_size=system.queue_size if args.queue_size is None else args.queue_size,
                  quiet=args.quiet)

    def stop(signum, frame):
        agent._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"hublab agent {__version__} on {agent.url} (profile {device.rt.profile.name}, "
          f"{len(device.rt.experts)} experts, queue {agent.gate.size}"
          f"{', token required' if token else ''})", flush=True)
    try:
        agent.serve_forever()
    finally:
        agent.stop()
        device.close()
    return 0
