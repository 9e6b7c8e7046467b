"""A live `hublab webui` on loopback over a workspace holding the tiny Llama, for the test_webui*.py files."""
from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from trainer_tiny import QA, tiny_hf  # noqa: F401


class Client:
    def __init__(self, url: str):
        self.url = url

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"X-Hublab": "1", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait(self, job_id: str, timeout: float = 240) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            _, p = self.call("GET", f"/api/jobs/{job_id}?lines=200")
            if p["status"] != "running":
                return p
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still running after {timeout}s")


def tiny_form(name: str, steps: int = 6, nproc: int = 1) -> dict:
    return {"name": name, "nproc": nproc, "data": [{"path": "datasets/qa.jsonl"}],
            "train": {"base": "models/tiny", "template": "plain", "max_steps": steps, "batch_size": 4,
                      "max_seq_len": 64, "lr": 0.05, "warmup_steps": 1, "eval_every": 3, "save_every": 3,
                      "eval_fraction": 0.2, "patience": 0, "threads": 1},
            "lora": {"r": 4, "alpha": 8}}


@pytest.fixture(scope="module")
def webui(tiny_hf, tmp_path_factory):  # noqa: F811
    """(Client, App, workspace) of a WebUI started as a new user starts it (no flags; a fresh $HUBLAB_HOME,
    so the user's models dir is empty and the embedded set is what Chat sees) serving a workspace with
    models/tiny and datasets/qa.jsonl."""
    from hublab.trainer.webui import make_server

    root = tmp_path_factory.mktemp("webui")
    ws = root / "ws"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HUBLAB_HOME", str(root / "home"))  # jobs the WebUI starts inherit it
        env.delenv("HUBLAB_CONFIG", raising=False)
        server, app = make_server(ws, port=0)
        shutil.copytree(tiny_hf, ws / "models" / "tiny")
        (ws / "datasets" / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QA))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield Client(f"http://127.0.0.1:{server.server_address[1]}"), app, ws
        server.shutdown()
        server.server_close()
