"""The HTTP base both servers (the agent and the WebUI) stand on: the Host rule, tokens, bodies, streams."""
import http.client
import threading
from http.server import ThreadingHTTPServer

import pytest

from hublab.runtime.inputs import is_loopback
from hublab.runtime.serve import http_base


@pytest.mark.parametrize("header, ok", [
    ("localhost", True), ("localhost:7860", True), ("127.0.0.1:8780", True), ("127.0.0.2", True),
    ("[::1]:7860", True), ("[::1]", True), ("::1", True),
    ("evil.example", False), ("evil.example:7860", False), ("localhost.evil.example", False),
    ("192.168.1.20:8780", False), ("[2001:db8::1]:80", False), ("", False), ("[::1", False),
])
def test_host_header_names_this_machine(header, ok):
    assert http_base.names_loopback(header) is ok


def test_loopback_binding_rule():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("pi.local") and not is_loopback("")


def test_bearer_token_and_constant_time_match():
    assert http_base.bearer_token({"Authorization": "Bearer s3cret "}) == "s3cret"
    assert http_base.bearer_token({"Authorization": "bearer s3cret"}) == "s3cret"
    assert http_base.bearer_token({"Authorization": "Basic czNjcmV0"}) == ""
    assert http_base.bearer_token({}) == ""
    assert http_base.token_matches("s3cret", "s3cret")
    assert not http_base.token_matches("", "s3cret") and not http_base.token_matches("s3cre", "s3cret")


class Echo(http_base.Handler):
    max_body = 64

    def log_message(self, fmt, *args):
        pass

    def do_POST(self):
        try:
            self.json({"got": self.body()})
        except http_base.HttpError as exc:
            self.json({"error": exc.message}, exc.status)

    def do_GET(self):
        for n in range(3):
            self.sse({"n": n})
        self.sse("{}", event="end")


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def post(port, body: bytes, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/", body, headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read().decode()


def test_bodies_are_one_bounded_json_object(server):
    assert post(server, b'{"a": 1}') == (200, '{"got": {"a": 1}}')
    assert post(server, b"") == (200, '{"got": {}}')
    status, text = post(server, b'{"a": "' + b"x" * 100 + b'"}')
    assert status == 413 and "over the 64 allowed" in text
    for bad, why in ((b"[1]", "must be a JSON object"), (b'{"a": NaN}', "not valid JSON"),
                     (b"{\xff}", "not UTF-8"), (b"{", "not valid JSON")):
        status, text = post(server, bad)
        assert status == 400 and why in text, (bad, text)


def test_chunked_and_bad_lengths_are_refused(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("POST", "/", body=iter([b'{"a": 1}']), headers={"Transfer-Encoding": "chunked"})
    r = conn.getresponse()
    assert r.status == 411 and "send Content-Length" in r.read().decode()
    status, text = post(server, b"{}", {"Content-Length": "-2"})
    assert status == 400 and "bad Content-Length" in text


def test_events_stream_frame_by_frame(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    assert r.read().decode().split("\n\n")[:4] == ['data: {"n": 0}', 'data: {"n": 1}', 'data: {"n": 2}',
                                                    "event: end\ndata: {}"]
