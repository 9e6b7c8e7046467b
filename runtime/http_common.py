"""What every HTTP route of the agent shares: the request object route handlers get, JSON bodies, errors,
streaming (SSE for OpenAI and hublab, NDJSON for Ollama), the generation queue, auth and metrics.

A route handler is a plain function `handler(req: Request) -> None` listed in its module's `ROUTES`
(http_openai, http_ollama, http_hublab); the agent merges those tables. Handlers raise `ApiError` for a
bad request; `UnknownModel` becomes 404, other `HublabError`s 400, each one JSON line in the shape of the
route's API (OpenAI's `{"error": {"message", ...}}` or Ollama's `{"error": "..."}`), never a traceback.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlparse

from hublab import __version__

from .device import UnknownModel
from .errors import HublabError
from .gate import Cancelled, QueueFull, watch_disconnect

if TYPE_CHECKING:
    from .agent import Agent

MAX_BODY = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class Route:
    """The handlers of one path by method, and whose error shape its answers use."""
    methods: dict[str, Callable[["Request"], None]]
    api: str = "openai"  # openai | ollama


Routes = dict[str, Route]


def number(key: str, value: Any, kind: type) -> int | float:
    """A JSON number checked for `kind` (int or float), else a 400 naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


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


class Request(BaseHTTPRequestHandler):
    """One HTTP request. Route handlers read `body()`, `query` and `agent.device`, and answer with `json`,
    a stream of frames (`sse`, `ndjson`) or `send`."""
    protocol_version = "HTTP/1.1"
    server_version = f"hublab/{__version__}"
    agent: "Agent"    # set on the subclass the Agent makes
    routes: Routes    # likewise

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

    def _dispatch(self, method: str) -> None:
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
        except ApiError as exc:
            self.error(exc.status, exc.message, exc.code, exc.headers)
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
        except HublabError as exc:
            self.error(400, str(exc), "invalid_request_error")
        except Exception as exc:  # noqa: BLE001 - one request must not take the agent down
            traceback.print_exc(file=sys.stderr)
            self.error(500, f"internal error: {exc.__class__.__name__}: {exc}", "internal_error")
        finally:
            if not self.body_read and self.headers.get("Content-Length", "0") not in ("", "0"):
                # an unread body would be parsed as the next request on this connection
                self.close_connection = True
            self.agent.metrics.count(label, self.status)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.agent.token.encode())

    # -- reading ------------------------------------------------------------------------------------------

    def body(self) -> dict:
        """The JSON object sent (empty when nothing was)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        self.body_read = True
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body is not valid JSON ({exc}); send a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    # -- answering ------------------------------------------------------------------------------------------

    def send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.completed = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(obj, default=str).encode(), "application/json", headers)

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

    def _start_stream(self, kind: str, content_type: str) -> None:
        self.status = 200
        self.stream_kind = kind
        self.close_connection = True  # the stream ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def _write(self, frame: bytes) -> None:
        """Send one frame; a client that went away cancels the generation instead of raising."""
        if self.gone:
            return
        try:
            self.wfile.write(frame)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.gone = True
            self.cancel.set()

    # A stream's headers go out with its first frame: whatever fails before it (an unknown model, a
    # model that does not fit, a prompt too long) still answers with its own status code.

    def sse(self, data: Any, event: str | None = None) -> None:
        if not self.stream_kind:
            self._start_stream("sse", "text/event-stream")
        text = data if isinstance(data, str) else json.dumps(data, default=str)
        self._write(((f"event: {event}\n" if event else "") + f"data: {text}\n\n").encode())

    def ndjson(self, obj: Any) -> None:
        if not self.stream_kind:
            self._start_stream("ndjson", "application/x-ndjson")
        self._write(json.dumps(obj, default=str).encode() + b"\n")

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
