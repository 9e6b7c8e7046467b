"""What every HTTP route of the agent shares: the request object route handlers get, JSON bodies, errors,
streaming (SSE for OpenAI and hublab, NDJSON for Ollama), the generation queue, auth and metrics.

A route handler is a plain function `handler(req: Request) -> None` listed in its module's `ROUTES`
(http_openai, http_ollama, http_hublab); the agent merges those tables. Handlers raise `ApiError` for a
bad request; `UnknownModel` becomes 404, other `HublabError`s 400, each one JSON line in the shape of the
route's API (OpenAI's `{"error": {"message", ...}}` or Ollama's `{"error": "..."}`), never a traceback.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Protocol
from urllib.parse import parse_qs, urlparse

from hublab import __version__

from ..config import request_fields
from .device import UnknownModel
from ..engine.peers import PeerError
from ..engine.rpc import RpcError
from ..errors import HublabError
from .gate import Cancelled, QueueFull, watch_disconnect
from .http_base import Handler, HttpError, bearer_token, token_matches
from ..inputs import number_problem, quote

if TYPE_CHECKING:
    from .device import Device
    from .gate import Gate



class Server(Protocol):
    """What a request needs of the server that runs it (the agent is one): its device, admission gate, counters,
    read deadlines and token, and a place to report how long an answer took."""
    device: Device
    gate: Gate
    metrics: Any
    deadlines: Deadlines
    token: str
    quiet: bool
    request_timeout: float

    def observe(self, seconds: float) -> None: ...

    def retry_after(self) -> int: ...


class ApiError(HttpError):
    """A request refused, with the error code OpenAI's shape carries (Ollama's shape has the message only)."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error", headers=None):
        super().__init__(status, message, headers)
        self.code = code


@dataclass(frozen=True)
class Route:
    """The handlers of one path by method, and whose error shape its answers use."""
    methods: dict[str, Callable[["Request"], None]]
    api: str = "openai"  # openai | ollama


Routes = dict[str, Route]


def number_field(key: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None) -> int | float:
    """A finite JSON number of `kind` (int or float) within [lo, hi], else a 400 naming the field."""
    problem = number_problem(value, kind is int, lo, hi)
    if problem:
        raise ApiError(400, f"{key}: {problem}")
    return kind(value)


def text_field(key: str, value: Any, limit: int = 256) -> str | None:
    """An optional string field (null or absent is None); another type or an overlong one is a 400."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string, got {type(value).__name__} {quote(value, 40)}")
    if len(value) > limit:
        raise ApiError(400, f"{key} is {len(value)} characters, over the {limit} allowed")
    return value


def object_field(key: str, value: Any) -> dict:
    """An optional JSON object field (null or absent is {}); anything else is a 400."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"{key} must be an object, got {type(value).__name__} {quote(value, 40)}")
    return value


def moe_fields(extra: dict, prefix: str = "") -> tuple[str | None, str | None]:
    """routing and synthesis from a request (its `hublab` object, or the body itself): strings that name a
    strategy and a synthesis, checked whatever the model, so a wrong one is a 400 and not silently unused."""
    from .device import check_moe_args

    routing = text_field(f"{prefix}routing", extra.get("routing"), 64)
    synthesis = text_field(f"{prefix}synthesis", extra.get("synthesis"), 64)
    check_moe_args(routing, synthesis)
    return routing, synthesis


def sampler_fields(fields: dict, surface: str, prefix: str = "") -> dict[str, Any]:
    """The sampler settings a request sets (config.SAMPLER's fields on `surface`) as Runtime.stream keywords,
    each checked against the table's type and request range: a bad one is a 400 naming the field."""
    out: dict[str, Any] = {}
    for name, (key, spec) in request_fields(surface).items():
        value = fields.get(name)
        if value is None:
            continue
        if spec.type is list:
            out[key] = stop_list(prefix + name, value)
            continue
        problem = spec.problem(value, request=True)
        if problem:
            raise ApiError(400, f"{prefix}{name}: {problem}")
        out[key] = spec.type(value)
    return out


@dataclass(frozen=True)
class Field:
    """One documented field of a request and what hublab does with it: `accepts` None = honoured (its handler
    reads it); else the values hublab's answer already keeps to (n 1, logprobs false, ...): any other is a 400
    saying `why`. No field is silently ignored."""
    accepts: Callable[[Any], bool] | None = None
    why: str = ""


def only(*values: Any) -> Callable[[Any], bool]:
    """A Field's `accepts`: these exact JSON values (true is not 1)."""
    return lambda v: any(type(v) is type(x) and v == x for x in values)


def nothing(value: Any) -> bool:
    """A Field's `accepts`: an empty value ({}, [], "", false)."""
    return value in ({}, [], "") or value is False


def check_fields(fields: dict, table: dict[str, Field], where: str = "") -> None:
    """A 400 for the first field of `fields` that `table` does not list, or whose value hublab does not honour."""
    if not isinstance(fields, dict):
        raise ApiError(400, f"{where.rstrip('.') or 'body'} must be an object")
    for name, value in fields.items():
        spec = table.get(name)
        if spec is None:
            import difflib

            close = difflib.get_close_matches(str(name), list(table), n=1)
            hint = f"did you mean {close[0]}?" if close else "leave it out"
            raise ApiError(400, f"{where}{quote(name, 40)[1:-1]}: not a field hublab takes here; {hint}")
        if spec.accepts is not None and value is not None and not spec.accepts(value):
            raise ApiError(400, f"{where}{name}: {quote(value, 40)} is not honoured: {spec.why}")


def stop_list(key: str, stop: Any) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"{key} must be a string or a list of non-empty strings")
    return stop


def iso_time(epoch: float | None = None) -> str:
    """RFC 3339 UTC time, as Ollama writes it."""
    when = datetime.fromtimestamp(time.time() if epoch is None else epoch, tz=timezone.utc)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


class Request(Handler):
    """One HTTP request to the agent. Route handlers read `body()`, `query` and `agent.device`, and answer with
    `json`, a stream of frames (`sse`, `ndjson`) or `send` (runtime/serve/http_base.py)."""
    protocol_version = "HTTP/1.1"
    server_version = f"hublab/{__version__}"
    agent: Server     # set on the subclass the Agent makes
    routes: Routes    # likewise
    timeout = 30      # seconds any one socket read or write may stall (the subclass sets the agent's value)
    timed_out = False  # the request did not arrive in time (Deadlines shut its reading side)
    api = "openai"
    stream_kind = ""

    # -- dispatch ---------------------------------------------------------------------------------------

    def log_message(self, fmt: str, *args) -> None:
        if not self.agent.quiet:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # Methods no route takes still get a JSON 404 or 405, not the standard library's HTML 501 page.
    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    # -- reading the request in bounded time ------------------------------------------------------------

    def handle_one_request(self) -> None:
        # From the first byte awaited to the body read, a request has agent.request_timeout seconds:
        # a client dripping its headers one byte at a time cannot hold this thread for longer.
        self.timed_out = False
        self.agent.deadlines.arm(self)
        try:
            super().handle_one_request()
        finally:
            self.agent.deadlines.disarm(self)

    def parse_request(self) -> bool:
        if self.timed_out:
            self.send_error(408)
            return False
        if not super().parse_request():
            return False
        if self.timed_out:  # the headers were cut short by the deadline: they are not all there
            self.send_error(408)
            return False
        if self.request_version == "HTTP/0.9":  # "GET /path" alone: an answer would have no status line
            self.send_error(400, "HTTP/0.9 requests are not supported; send HTTP/1.1")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's errors (a bad request line, headers too long or too many, a timeout)
        as one JSON error in the shape of the path's API, instead of its HTML page."""
        path = urlparse(getattr(self, "path", "") or "").path if isinstance(getattr(self, "path", None), str) else ""
        self.api = "ollama" if path.startswith("/api/") else "openai"
        self.stream_kind = ""
        self.close_connection = True
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            self.request_version = "HTTP/1.0"  # a request line we could not read still gets a status line
        if code == 501:  # a method no handler exists for: the client's mistake, not the server's
            code, message = 405, f"method {str(self.command)[:20]!r} is not supported; use GET, POST or DELETE"
        elif code == 505:  # likewise an HTTP/2.0 or 9.9 request line: a bad request, answered in HTTP/1.1
            code, message = 400, f"{message or 'that HTTP version'}; send HTTP/1.1"
        if code == 408:
            message = (f"the request did not arrive within {self.agent.request_timeout:g} s; send the whole "
                       "request at once")
        reason = message or self.responses.get(code, ("bad request",))[0]
        self.log_error("code %d, message %s", code, reason)
        self.error(code, reason, "request_timeout" if code == 408 else "invalid_request_error")

    def _dispatch(self, method: str) -> None:
        if method in ("GET", "HEAD", "OPTIONS") or not self.headers.get("Content-Length"):
            self.agent.deadlines.disarm(self)  # nothing more to read: the answer may take its time
        url = urlparse(self.path)
        path = url.path.rstrip("/") or "/"
        self.query = parse_qs(url.query)
        self.status = 0
        self.cancel = threading.Event()
        self.gone = False
        self.stream_kind = ""    # "sse" | "ndjson" once a stream's headers are out
        self.completed = False   # the whole response went out; a disconnect after that cancels nothing
        self.body_read = False
        route = self.routes.get(path)
        self.api = route.api if route else ("ollama" if path.startswith("/api/") else "openai")
        label = path if route else "other"
        try:
            if self.agent.token and not self._authorized():
                raise ApiError(401, "missing or wrong bearer token; send the header Authorization: Bearer <token>",
                               "invalid_api_key", {"WWW-Authenticate": 'Bearer realm="hublab"'})
            if route is None:
                raise ApiError(404, f"no endpoint {path}; see /v1/models, /api/tags, /hublab/experts, /health",
                               "not_found")
            if method not in route.methods:
                raise ApiError(405, f"{path} takes {' or '.join(route.methods)}", "method_not_allowed",
                               {"Allow": ", ".join(route.methods)})
            route.methods[method](self)
        except TimeoutError:  # a socket read or write stalled for `timeout` seconds
            self.close_connection = True
            if not self.status:
                self.error(408, f"the request did not arrive within {self.timeout:g} s", "request_timeout")
        except HttpError as exc:
            self.error(exc.status, exc.message, getattr(exc, "code", "invalid_request_error"), exc.headers)
        except QueueFull as exc:
            self.agent.metrics.bump("rejected")
            self.error(503, str(exc), "queue_full", {"Retry-After": str(self.agent.retry_after())})
        except (Cancelled, BrokenPipeError, ConnectionResetError):
            if self.cancel.is_set():
                self.agent.metrics.bump("cancelled")
            self.close_connection = True
            self.status = self.status or 499  # nginx's "client closed request", for the request counter
        except UnknownModel as exc:
            self.error(404, str(exc), "model_not_found")
        except PeerError as exc:  # the board running the expert failed it: a gateway's error, not the asker's
            self.error(502, str(exc), "bad_gateway")
        except RpcError as exc:  # a worker of a split base is away: the base loads again once it answers
            self.error(503, str(exc), "worker_unavailable", {"Retry-After": "10"})
        except HublabError as exc:
            self.error(400, str(exc), "invalid_request_error")
        except Exception as exc:  # noqa: BLE001 - one request must not take the agent down
            traceback.print_exc(file=sys.stderr)
            self.error(500, f"internal error: {exc.__class__.__name__}: {exc}", "internal_error")
        finally:
            if not self.body_read and (self.headers.get("Content-Length", "0") not in ("", "0")
                                       or self.headers.get("Transfer-Encoding")):
                # an unread body would be parsed as the next request on this connection
                self.close_connection = True
            self.agent.metrics.count(label, self.status)

    def _authorized(self) -> bool:
        return token_matches(bearer_token(self.headers), self.agent.token)

    # -- reading and answering (http_base.Handler), with the agent's deadlines ----------------------------

    def body_arrived(self) -> None:
        self.agent.deadlines.disarm(self)

    def cut_short(self, got: int, length: int) -> HttpError:
        if self.timed_out:
            return HttpError(408, f"the body did not arrive within {self.agent.request_timeout:g} s; "
                                  "send the whole request at once")
        return super().cut_short(got, length)

    def sent(self) -> None:
        self.completed = True

    def write_frame(self, frame: bytes) -> bool:
        """A client that went away cancels the generation."""
        if super().write_frame(frame):
            return True
        self.cancel.set()
        return False

    def error(self, status: int, message: str, code: str, headers: dict | None = None) -> None:
        """One error, in the shape of this route's API; once a stream has started, as its last frame."""
        if self.api == "ollama":
            doc: dict = {"error": message}
        else:
            doc = {"error": {"message": message, "type": code, "code": code, "param": None}}
        if self.stream_kind == "sse":
            doc["error"].pop("param", None)
            self.sse(doc)
        elif self.stream_kind == "ndjson":
            self.ndjson(doc)
        else:
            self.json(doc, status, headers)

    # -- generating ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def generation(self, bases: list[str]):
        """Wait for the bases in the queue, watching for the client leaving meanwhile and during the work."""
        with watch_disconnect(self.connection, self.cancel), self.agent.gate.enter(bases, self.cancel):
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.agent.observe(time.perf_counter() - t0)
        if self.cancel.is_set() and not self.completed:
            self.agent.metrics.bump("cancelled")
        self.cancel.clear()  # counted once; the request ends normally from here

    @property
    def ended(self) -> bool:
        """The client left (or cancelled) during the generation: nothing more to send."""
        return self.gone or self.cancel.is_set()


class Deadlines:
    """When each connection's request must have arrived. A sweep shuts the reading side of a late one:
    its read returns at once with what came, and the request is answered 408 and closed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._due: dict[Request, float] = {}

    def arm(self, req: Request) -> None:
        with self._lock:
            self._due[req] = time.monotonic() + self.seconds

    def disarm(self, req: Request) -> None:
        with self._lock:
            self._due.pop(req, None)

    def sweep(self) -> int:
        """Cut every request past its deadline; returns how many were cut."""
        now = time.monotonic()
        with self._lock:
            late = [r for r, due in self._due.items() if due <= now]
            for r in late:
                del self._due[r]
        for r in late:
            r.timed_out = True
            with contextlib.suppress(OSError):
                r.connection.shutdown(socket.SHUT_RD)
        return len(late)
