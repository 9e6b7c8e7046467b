"""What hublab's two HTTP servers, the device agent and the trainer's WebUI, share: who may connect (the loopback
rule, bearer tokens compared in constant time, the Host header of a loopback server), how a request body is read
(a declared length, a limit, one UTF-8 JSON object of finite numbers) and how JSON and event streams are sent.
Each server adds its routes and the shape of its errors (`HttpError` carries the status and the message).
"""
from __future__ import annotations

import hmac
import json
from http.server import BaseHTTPRequestHandler
from typing import Any

from ..inputs import is_loopback, quote

MAX_BODY = 1 << 20


def names_loopback(host_header: str) -> bool:
    """Whether a request's Host header names this machine by "localhost" or a loopback address. A server that
    trusts loopback checks it: a page from another name that resolves to 127.0.0.1 (DNS rebinding) must not reach it."""
    value = host_header.strip()
    if value.startswith("["):
        host = value[1:value.find("]")] if "]" in value else ""
    else:
        host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return is_loopback(host)


def bearer_token(headers) -> str:
    """The token of an `Authorization: Bearer <token>` header; empty when there is none."""
    scheme, _, given = (headers.get("Authorization") or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def token_matches(given: str, token: str) -> bool:
    """`given` is the server's token (compared in constant time, so timing tells nothing of it)."""
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


class HttpError(Exception):
    """A request refused: the HTTP status, one line saying why and what to send instead, extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class Handler(BaseHTTPRequestHandler):
    """One request. Subclasses route it and answer errors in their API's shape; this reads and sends."""
    max_body = MAX_BODY   # bytes `body()` accepts
    status = 0            # the status sent (0: none yet)
    body_read = False     # the body was read (an unread one would be parsed as the next request)
    stream_kind = ""      # the content type of a stream once its headers are out
    gone = False          # the client went away during a stream

    # -- reading ---------------------------------------------------------------------------------------

    def read_body(self, limit: int, over: str = "") -> bytes:
        """The body's bytes, as declared by Content-Length and at most `limit` (else 413 with `over`, which may
        name {length} and {limit}). Chunked bodies are refused (411): the length is checked before reading."""
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "chunked request bodies are not supported; send Content-Length")
        given = (self.headers.get("Content-Length") or "0").strip()
        if not given.isascii() or not given.isdigit() or len(given) > 12:
            raise HttpError(400, f"bad Content-Length {quote(given, 24)}; send the body's size in bytes")
        length = int(given)
        if length > limit:
            self.close_connection = True
            raise HttpError(413, (over or "request body of {length} bytes is over the {limit} allowed").format(
                length=length, limit=limit))
        try:
            raw = self.rfile.read(length) if length else b""
        except TimeoutError:
            raise HttpError(408, f"the body did not arrive within {self.timeout:g} s") from None
        finally:
            self.body_arrived()
        self.body_read = True
        if len(raw) < length:
            self.close_connection = True
            raise self.cut_short(len(raw), length)
        return raw

    def body_arrived(self) -> None:
        """Called once the body is read (or failed to arrive): a server timing requests stops the clock here."""

    def cut_short(self, got: int, length: int) -> HttpError:
        return HttpError(400, f"the body ended after {got} of its {length} bytes (Content-Length)")

    def body(self) -> dict:
        """The JSON object sent (empty when nothing was): UTF-8, at most `max_body` bytes, finite numbers."""
        raw = self.read_body(self.max_body)
        if not raw:
            return {}
        try:
            doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
        except UnicodeDecodeError as exc:
            raise HttpError(400, f"body is not UTF-8 (byte {exc.start}); send JSON as UTF-8") from None
        except RecursionError:
            raise HttpError(400, "body is nested too deeply; send a flatter JSON object") from None
        except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer too long to convert
            raise HttpError(400, f"body is not valid JSON ({quote(str(exc), 120)[1:-1]}); send a JSON object") from None
        if not isinstance(doc, dict):
            raise HttpError(400, "body must be a JSON object")
        return doc

    # -- answering -------------------------------------------------------------------------------------

    def send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        """One whole response (no body for HEAD); a client that went away only closes the connection."""
        self.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
            self.sent()
        except OSError:  # the client went away, or stopped reading for `timeout` seconds
            self.close_connection = True

    def sent(self) -> None:
        """Called when a whole response went out."""

    def json(self, obj: Any, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(obj, default=str).encode(), "application/json", headers)

    # A stream's headers go out with its first frame: whatever fails before it still answers with its own status.

    def start_stream(self, kind: str, content_type: str) -> None:
        self.status = 200
        self.stream_kind = kind
        self.close_connection = True  # the stream ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def write_frame(self, frame: bytes) -> bool:
        """Send one frame of a stream; False (and `gone`) once the client has gone, instead of raising."""
        if self.gone:
            return False
        try:
            self.wfile.write(frame)
            self.wfile.flush()
            return True
        except OSError:  # BrokenPipeError, ConnectionResetError, a stalled client's timeout
            self.gone = True
            return False

    def sse(self, data: Any, event: str | None = None) -> None:
        """One Server-Sent Event (the stream's headers first, on the first one)."""
        if not self.stream_kind:
            self.start_stream("sse", "text/event-stream")
        text = data if isinstance(data, str) else json.dumps(data, default=str)
        self.write_frame(((f"event: {event}\n" if event else "") + f"data: {text}\n\n").encode())

    def ndjson(self, obj: Any) -> None:
        """One line of a newline-delimited JSON stream (Ollama's)."""
        if not self.stream_kind:
            self.start_stream("ndjson", "application/x-ndjson")
        self.write_frame(json.dumps(obj, default=str).encode() + b"\n")
