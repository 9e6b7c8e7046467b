"""What the shell's commands talk to: the device in this process, or an agent over HTTP.

`Client` is that API. `hublab.runtime.serve.device.Device` implements it in process and `RemoteClient` over
the agent's /hublab endpoints (tests/test_client.py checks both have every method, with compatible
arguments). The commands are written once against it; `connect()` picks the implementation.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Protocol

from hublab.runtime.errors import HublabError


class Client(Protocol):
    """The device API the shell's commands call. Every method returns plain data (dicts of JSON values)
    and raises HublabError with a one-line message."""
    local: bool  # the device is this process (pkg works only there)

    def list(self) -> dict:
        """Models and experts on disk: each one's type, base, quant, size, memory estimate, loaded or not."""

    def names(self) -> list[str]:
        """Model and expert names."""

    def load(self, name: str) -> dict:
        """Load a model or expert, fit-checked against the board's memory budget."""

    def unload(self, name: str) -> dict:
        """Unload a model (a base takes its adapter experts with it)."""

    def rescan(self) -> dict:
        """Re-read the models dir (after a package install)."""

    def info(self, name: str | None = None) -> dict:
        """The runtime (no name), or one model: parameters, quantization, context, memory, last tokens/s."""

    def stats(self) -> dict:
        """Per-expert calls, tokens and tokens/s, and memory."""

    def config(self, key: str, value: Any, name: str | None = None) -> dict:
        """Set and save a system.toml setting, or (with `name`) a model's sampler setting."""

    def settings(self, routing: str | None = None, synthesis: str | None = None) -> dict:
        """Show routing and synthesis; with values, set and save them."""

    def route(self, query: str, routing: str | None = None) -> dict:
        """Every expert's score for `query` and the ones the routing selects (nothing generated)."""

    def benchmark(self, name: str | None = None, max_tokens: int = 64,
                  cancel: threading.Event | None = None) -> dict:
        """Prompt and generation tokens/s of one model on a fixed prompt."""

    def ask(self, query: str, routing: str | None = None, synthesis: str | None = None,
            on_event: Callable[[str, dict], None] | None = None, cancel: threading.Event | None = None,
            max_tokens: int | None = None, format: Any = None) -> dict:
        """Route `query`, run the experts and synthesise one answer; `on_event(kind, data)` follows the steps.
        `format`: "json" or a JSON schema every answer keeps to."""

    def version(self) -> dict:
        """hublab's version, the board profile, and where the device is."""

    def health(self) -> dict:
        """Whether the device answers, its version, profile and loaded models."""

    def close(self) -> None:
        """Let go of the runtime or the connection."""


def connect(remote: str | None = None, *, token: str | None = None, config: str | None = None,
            profile: str | None = None) -> Client:
    """A Device over the local runtime, or a RemoteClient for an agent at `remote`."""
    if remote:
        return RemoteClient(remote, token=token if token is not None else os.environ.get("HUBLAB_TOKEN", ""))
    from hublab.runtime.serve.device import Device

    return Device.open(config, profile=profile)


class RemoteClient:
    """The Client methods, answered by a `hublab serve` agent (its /hublab endpoints and /health)."""

    local = False

    def __init__(self, url: str, token: str = "", timeout: float = 600.0):
        import httpx

        self.url = agent_url(url)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._http = httpx.Client(base_url=self.url, headers=headers,
                                      timeout=httpx.Timeout(timeout, connect=10.0))
        except (httpx.InvalidURL, ValueError) as exc:
            raise HublabError(f"--remote {self.url[:80]!r} is not a usable URL ({exc}); "
                              "write http://HOST:PORT") from None
        self._names: list[str] | None = None

    # -- plumbing ---------------------------------------------------------------------------------------

    def _check(self, response) -> Any:
        if response.status_code == 401:
            raise HublabError(f"the agent at {self.url} refused the token (401); pass --token or set HUBLAB_TOKEN")
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text.strip()[:200] or response.reason_phrase
            if response.status_code == 503:
                message += f" (Retry-After {response.headers.get('Retry-After', '?')} s)"
            raise HublabError(f"agent: {message}")
        return response.json()

    def _call(self, method: str, path: str, **kw) -> Any:
        import httpx

        try:
            return self._check(self._http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise HublabError(f"cannot reach the agent at {self.url} ({exc.__class__.__name__}: {exc}); "
                              "start it with `hublab serve` or check the --remote URL") from None

    def _get(self, path: str, **params) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def _post(self, path: str, body: dict) -> Any:
        return self._call("POST", path, json=body)

    # -- the Client methods ----------------------------------------------------------------------------

    def list(self) -> dict:
        data = self._get("/hublab/experts")
        self._names = sorted(r["name"] for r in data["models"])
        return data

    def names(self) -> list[str]:
        if self._names is None:
            self.list()
        return list(self._names or [])

    def load(self, name: str) -> dict:
        return self._post("/hublab/load", {"name": name})

    def unload(self, name: str) -> dict:
        return self._post("/hublab/unload", {"name": name})

    def rescan(self) -> dict:
        self._names = None
        return {"models": self.names(), "errors": []}

    def info(self, name: str | None = None) -> dict:
        return self._get("/hublab/info", name=name)

    def stats(self) -> dict:
        return self._get("/hublab/stats")

    def config(self, key: str, value: Any, name: str | None = None) -> dict:
        return self._post("/hublab/config", {"key": key, "value": value, "name": name})

    def settings(self, routing: str | None = None, synthesis: str | None = None) -> dict:
        if routing or synthesis:
            return self._post("/hublab/settings", {"routing": routing, "synthesis": synthesis})
        return self._get("/hublab/settings")

    def route(self, query: str, routing: str | None = None) -> dict:
        return self._post("/hublab/route", {"query": query, "routing": routing})

    def benchmark(self, name: str | None = None, max_tokens: int = 64, cancel: threading.Event | None = None) -> dict:
        return self._post("/hublab/benchmark", {"name": name, "max_tokens": max_tokens})

    def ask(self, query: str, routing: str | None = None, synthesis: str | None = None,
            on_event: Callable[[str, dict], None] | None = None, cancel: threading.Event | None = None,
            max_tokens: int | None = None, format: Any = None) -> dict:
        """Stream the agent's Ensemble events; setting `cancel` closes the stream, which stops the agent too."""
        import httpx

        body = {"query": query, "routing": routing, "synthesis": synthesis, "max_tokens": max_tokens, "stream": True,
                **({"format": format} if format is not None else {})}
        answer: list[str] = []
        result = None
        try:
            with self._http.stream("POST", "/hublab/ask", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                for kind, data in iter_sse(response.iter_lines()):
                    if kind == "answer_token":
                        answer.append(data.get("text", ""))
                    if "error" in data and kind is None:
                        raise HublabError(f"agent: {data['error'].get('message', data['error'])}")
                    if on_event:
                        on_event(kind, data)
                    if kind == "done":
                        result = data["result"]
                    if cancel is not None and cancel.is_set():
                        break  # leaving the with-block closes the connection: the agent cancels
        except httpx.TransportError as exc:
            raise HublabError(f"lost the agent at {self.url} ({exc.__class__.__name__}); check it is running") from None
        if result is None:
            result = {"query": query, "answer": "".join(answer), "finish_reason": "cancelled", "selected": [],
                      "answers": [], "scores": [], "timings": {}, "routing": routing, "synthesis": synthesis}
        return result

    def version(self) -> dict:
        h = self.health()
        return {"hublab": h["version"], "profile": h["profile"], "where": self.url}

    def health(self) -> dict:
        return self._get("/health")

    def close(self) -> None:
        self._http.close()


def agent_url(url: str) -> str:
    """`--remote` as an http(s) base URL (host[:port] alone means http), or a one-line error saying why not."""
    from urllib.parse import urlsplit

    from hublab.runtime.inputs import has_surrogates, quote

    given = url
    if has_surrogates(url) or any(c.isspace() or ord(c) < 32 for c in url) or len(url) > 2048:
        raise HublabError(f"--remote {quote(given)} is not a URL; write http://HOST:PORT")
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        port = parts.port  # a port that is not a number, or over 65535, raises here
    except ValueError as exc:
        raise HublabError(f"--remote {quote(given)} is not a URL ({exc}); write http://HOST:PORT, e.g. "
                          "http://[::1]:8780") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HublabError(f"--remote {quote(given)} is not an http(s) URL with a host; write http://HOST:PORT")
    if port == 0:
        raise HublabError(f"--remote {quote(given)}: port 0 is not a port an agent listens on")
    return url.rstrip("/")


def iter_sse(lines):
    """(event, data) pairs from SSE lines; data is parsed JSON, or {"text": ...} when it is not JSON."""
    event, data = None, []
    for line in lines:
        if line == "":
            if data:
                raw = "\n".join(data)
                try:
                    parsed = json.loads(raw)
                except json.JSONDecodeError:
                    parsed = {"text": raw}
                yield event, parsed if isinstance(parsed, dict) else {"value": parsed}
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
