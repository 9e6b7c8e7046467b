"""`hublab webui` over HTTP: safety (loopback, token, CSRF header, size limit, workspace paths), uploads
checked before writing, the TOML and command it shows, a tiny training watched through SSE, export and
download, a 2-process torchrun training, chat and the A/B bench through the runtime, the shell's models on
a fresh start, and an exported adapter installed as an expert that the shell, Chat and Evaluate then use."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trainer_tiny import QA, tiny_hf  # noqa: F401
from test_webui_support import Client, tiny_form, webui  # noqa: F401

from hublab.trainer.webui import make_server
from hublab.trainer.webui_data import WebError


def test_off_loopback_needs_a_token_and_loopback_refuses_other_hosts(tmp_path, webui):  # noqa: F811
    with pytest.raises(WebError, match="needs a token"):
        make_server(tmp_path / "ws", host="0.0.0.0", port=0)
    client, _, _ = webui
    assert client.call("GET", "/api/info", headers={"Host": "evil.example:7860"})[0] == 401
    assert client.call("POST", "/api/mix", {}, headers={"X-Hublab": ""})[0] == 403


def test_a_token_is_required_when_set(tmp_path):
    import threading

    server, _ = make_server(tmp_path / "ws", host="127.0.0.1", port=0, token="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = Client(f"http://127.0.0.1:{server.server_address[1]}")
        assert c.call("GET", "/api/info")[0] == 401
        assert c.call("GET", "/api/info", headers={"Authorization": "Bearer nope"})[0] == 401
        assert c.call("GET", "/api/info", headers={"Authorization": "Bearer s3cret"})[0] == 200
        with urllib.request.urlopen(c.url + "/?token=s3cret") as r:  # the printed URL sets a cookie
            assert "hublab_token=s3cret" in r.headers["Set-Cookie"] and b"app.js" in r.read()
    finally:
        server.shutdown()
        server.server_close()


def test_page_is_offline(webui):  # noqa: F811
    client, _, _ = webui
    for name in ("/", "/static/app.js", "/static/app.css"):
        with urllib.request.urlopen(client.url + name) as r:
            text = r.read().decode()
        assert "http://" not in text.replace("http://127", "") and "https://" not in text, name
    with urllib.request.urlopen(client.url + "/") as r:
        assert "width=device-width" in r.read().decode()


def test_bad_uploads_say_row_and_field_and_write_nothing(webui):  # noqa: F811
    client, app, ws = webui
    before = sorted(p.name for p in (ws / "datasets").rglob("*"))
    bad = b'{"question": "a", "response": "b"}\n{"question": "c"}\n{"question": "d", "response": 3}\n'
    status, body = client.call("PUT", "/api/datasets?file=bad.jsonl", raw=bad)
    assert status == 422
    assert "row 2: missing column 'response'" in body["error"]
    assert "row 3: column 'response' must be a string" in body["error"]
    status, body = client.call("PUT", "/api/datasets?file=broken.jsonl", raw=b'{"text": "a"}\n{oops\n')
    assert status == 422 and "broken.jsonl:2: invalid JSON" in body["error"]
    status, body = client.call("PUT", "/api/datasets?file=x.jsonl&folder=..", raw=b'{"text": "a"}\n')
    assert status == 400 and "folder '..'" in body["error"]
    status, body = client.call("PUT", "/api/datasets?file=..%2Fx.jsonl", raw=b'{"text": "a"}\n')
    assert status == 400
    old, app.max_upload = app.max_upload, 10
    try:
        status, body = client.call("PUT", "/api/datasets?file=big.jsonl", raw=b'{"text": "0123456789"}\n')
        assert status == 413 and "over the limit of 10 bytes" in body["error"]
    finally:
        app.max_upload = old
    assert sorted(p.name for p in (ws / "datasets").rglob("*")) == before


def test_paths_stay_in_the_workspace(webui):  # noqa: F811
    client, _, _ = webui
    assert client.call("GET", "/api/inspect?path=../../etc/passwd")[0] == 403
    assert client.call("GET", "/api/inspect?path=/etc/passwd")[0] == 403
    assert client.call("GET", "/api/files?path=..")[0] == 403
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(client.url + "/files/..%2F..%2Fetc%2Fpasswd")
    assert exc.value.code == 403
    form = tiny_form("escape")
    form["data"] = [{"path": "../outside.jsonl"}]
    assert client.call("POST", "/api/train/plan", form)[0] == 403
    assert client.call("POST", "/api/export/plan", {"kind": "adapter", "source": "/etc", "out": "x"})[0] == 403


def test_upload_inspect_mix(webui):  # noqa: F811
    client, _, ws = webui
    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say hi", "output": "hi"},
            {"instruction": "Count", "input": "to 3", "output": "1 2 3"}]
    status, body = client.call("PUT", "/api/datasets?file=alp.json", raw=json.dumps(rows, indent=1).encode())
    assert status == 201 and body == {"path": "datasets/alp.json", "records": 3, "format": "alpaca"}
    status, r = client.call("GET", "/api/inspect?path=datasets/alp.json&template=chatml")
    assert r["records"] == 3 and r["duplicate_count"] == 1
    assert r["duplicates"][0] == {"row": "6", "same_as": "2"}  # lines in the file
    assert r["preview"][0]["rendered"].startswith("<|im_start|>user\nSay hi<|im_end|>")
    assert sum(b["count"] for b in r["histogram"]) == 3
    status, r = client.call("GET", "/api/inspect?path=datasets/qa.jsonl&base=models/tiny&template=plain&rows=1")
    assert r["unit"] == "tokens" and r["preview"][0]["rendered"].startswith("<s>user: Tell me fact 0.")
    status, r = client.call("POST", "/api/mix", {"name": "mix", "total": 40, "parts": [
        {"path": "datasets/qa.jsonl", "ratio": 3}, {"path": "datasets/alp.json", "ratio": 1}]})
    assert status == 201 and r == {"path": "datasets/mix.jsonl", "records": 40}
    lines = [json.loads(x) for x in (ws / "datasets" / "mix.jsonl").read_text().splitlines()]
    assert sum("Say hi" in json.dumps(x) or "Count" in json.dumps(x) for x in lines) == 10


def test_plan_is_the_toml_train_reads_and_a_copyable_command(webui):  # noqa: F811
    from hublab.trainer.train import load_config

    client, _, ws = webui
    form = tiny_form("planned", steps=7, nproc=2)
    form["train"].update(epochs=0.5, gradient_checkpointing=True)
    form["lora"]["targets"] = "q_proj,v_proj"
    form["data"].append({"path": "datasets/qa.jsonl", "ratio": 0.25, "format": "qa"})
    status, plan = client.call("POST", "/api/train/plan", form)
    assert status == 200, plan
    assert plan["command"].split()[1:] == ["--standalone", "--nproc_per_node=2", "-m", "hublab.trainer.train",
                                           "expert", str(ws / "runs" / "planned" / "expert.toml")]
    path = ws / "planned.toml"
    path.write_text(plan["toml"])
    cfg, _ = load_config(path)
    assert (cfg.max_steps, cfg.epochs, cfg.gradient_checkpointing, cfg.lora_r, cfg.lora_targets) == (
        7, 0.5, True, 4, ["q_proj", "v_proj"])
    assert [d.ratio for d in cfg.data] == [1.0, 0.25] and cfg.output == ws / "runs" / "planned" / "out"
    assert not (ws / "runs" / "planned").exists()  # planning writes nothing
    form["lora"]["init"] = "../elsewhere/expert.gguf"  # an adapter to start from stays inside the workspace
    status, body = client.call("POST", "/api/train/plan", form)
    assert status == 403 and "leads outside the workspace" in body["error"]
    form["lora"]["init"] = ""
    form["train"]["max_seq_len"] = 0
    status, body = client.call("POST", "/api/train", form)
    assert status == 422 and "max_seq_len: must be at least 1" in body["error"]


def _events(client: Client, job_id: str, limit: float = 240) -> list[dict]:
    """Every SSE frame of a job until it ends."""
    frames = []
    with urllib.request.urlopen(f"{client.url}/api/jobs/{job_id}/events", timeout=limit) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: ") and line != "data: {}":
                frames.append(json.loads(line[6:]))
            if line == "event: end":
                break
    return frames


def test_train_live_over_sse_then_export_and_download(webui):  # noqa: F811
    client, _, ws = webui
    form = tiny_form("sse", steps=40)  # enough steps to span several half-second pushes
    form["train"]["eval_every"] = 10
    status, job = client.call("POST", "/api/train", form)
    assert status == 201, job
    assert client.call("POST", "/api/train", tiny_form("sse"))[0] == 409  # one training per run at a time
    frames = _events(client, job["id"])
    assert frames[-1]["status"] == "done"
    seen = [len(f["steps"]) for f in frames]
    assert seen == sorted(seen) and len(set(seen)) >= 3  # the loss curve grew over several pushes
    last = frames[-1]
    assert [s["step"] for s in last["steps"]] == list(range(1, 41))
    assert [s["step"] for s in last["steps"] if "eval_loss" in s] == [10, 20, 30, 40]
    assert last["result"]["steps"] == 40 and last["tok_s"] > 0
    assert (ws / "runs" / "sse" / "out" / "adapter" / "adapter_config.json").exists()
    status, runs = client.call("GET", "/api/jobs?kind=train")
    assert job["id"] in [r["id"] for r in runs]

    status, exp = client.call("POST", "/api/export", {"kind": "adapter", "source": "runs/sse/out/adapter",
                                                      "out": "sse.gguf", "outtype": "f16"})
    assert status == 201, exp
    assert client.wait(exp["id"])["status"] == "done"
    with urllib.request.urlopen(f"{client.url}/files/exports/sse.gguf") as r:
        data = r.read()
        assert "attachment" in r.headers["Content-Disposition"]
    assert data[:4] == b"GGUF" and data == (ws / "exports" / "sse.gguf").read_bytes()


def test_stop_and_resume(webui):  # noqa: F811
    client, _, ws = webui
    status, job = client.call("POST", "/api/train", tiny_form("stopme", steps=400))
    assert status == 201
    end = time.time() + 120
    while time.time() < end:
        _, p = client.call("GET", f"/api/jobs/{job['id']}")
        if len(p["steps"]) >= 4:
            break
        time.sleep(0.3)
    _, p = client.call("POST", f"/api/jobs/{job['id']}/stop", {})
    assert p["stopped"] is True
    assert client.wait(job["id"], 60)["status"] == "stopped"
    saved = json.loads((ws / "runs" / "stopme" / "out" / "checkpoint" / "state.json").read_text())["step"]
    assert saved >= 3
    status, again = client.call("POST", f"/api/jobs/{job['id']}/resume", {"max_steps": saved + 2})
    assert status == 201
    done = client.wait(again["id"])
    assert done["status"] == "done", done["log"]
    assert any(line.startswith("resuming from") for line in done["log"])
    assert [s["step"] for s in done["steps"]] == [saved + 1, saved + 2]


def test_two_processes_through_torchrun(webui):  # noqa: F811
    client, _, ws = webui
    status, job = client.call("POST", "/api/train", tiny_form("ddp", steps=4, nproc=2))
    assert status == 201, job
    assert "torch" in job["commands"][0][0] and "--nproc_per_node=2" in job["commands"][0]
    done = client.wait(job["id"])
    log = (ws / "jobs" / job["id"] / "log.txt").read_text()
    assert done["status"] == "done", log[-2000:]
    # only rank 0 reports: one step line per step and one result
    assert [s["step"] for s in done["steps"]] == [1, 2, 3, 4]
    assert log.count('{"output"') == 1 and done["result"]["steps"] == 4
    assert (ws / "runs" / "ddp" / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_chat_and_bench_through_the_runtime(tiny_models_dir, tmp_path):
    import threading

    server, app = make_server(tmp_path / "ws", port=0, models_dir=tiny_models_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = Client(f"http://127.0.0.1:{server.server_address[1]}")
        status, models = c.call("GET", "/api/models")
        alpha = next(m for m in models["models"] if m["name"] == "alpha")
        assert (alpha["expert"], alpha["base"]) == (True, "tiny") and models["dirs"] == [str(tiny_models_dir)]
        assert [m["name"] for m in models["models"]][-1] == "tiny"  # experts first, then the base
        status, r = c.call("POST", "/api/chat", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 4})
        assert status == 200 and r["tokens"] >= 1 and isinstance(r["text"], str)
        assert c.call("POST", "/api/chat", {"model": "alpha", "messages": [{"role": "x"}]})[0] == 400
        (app.ws / "datasets" / "q.jsonl").write_text('{"question": "hello?", "terms": ["hello"]}\n')
        status, job = c.call("POST", "/api/bench",
                             {"expert": "alpha", "questions": "datasets/q.jsonl", "max_tokens": 4})
        assert status == 201, job
        assert c.wait(job["id"], 120)["status"] == "done"
        status, r = c.call("GET", f"/api/jobs/{job['id']}/bench")
        row = r["rows"][0]
        assert r["summary"]["expert"]["model"] == "alpha" and row["question"] == "hello?"
        assert {"answer", "hit", "degenerate", "mentions"} <= set(row["base"]) and "expert" in row
    finally:
        server.shutdown()
        server.server_close()


def test_cli_verb_is_in_the_table():
    out = subprocess.run([sys.executable, "-m", "hublab.cli", "webui", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--workspace" in out.stdout and "--token" in out.stdout


def test_a_fresh_start_sees_the_shells_models_and_offers_the_embedded_base(webui):  # noqa: F811
    client, app, _ = webui
    status, r = client.call("GET", "/api/models")
    names = [m["name"] for m in r["models"]]
    assert status == 200 and {"python", "rust", "general", "gemma3-270m"} <= set(names)
    gemma = next(m for m in r["models"] if m["name"] == "gemma3-270m")
    assert gemma["type"] == "base" and not gemma["expert"] and gemma["embedded"]
    assert names.index("python") < names.index("gemma3-270m") and not r["errors"]  # experts first
    assert r["install_dir"] == os.environ["HUBLAB_HOME"] + "/models"
    _, info = client.call("GET", "/api/info")
    assert info["schema"]["train"]["base"]["default"] == "gemma3-270m"
    assert {"gemma3-270m", "models/tiny"} <= {b["value"] for b in info["bases"]}
    status, body = client.call("POST", "/api/bench", {"expert": "nope", "questions": "datasets/qa.jsonl"})
    assert status == 404 and "choose one of" in body["error"] and "python" in body["error"]


def test_inspect_renders_with_the_template_the_run_uses(webui):  # noqa: F811
    client, _, _ = webui
    status, r = client.call("GET", "/api/inspect?path=datasets/qa.jsonl&base=gemma3-270m&template=auto&rows=1")
    assert status == 200, r
    assert r["template"] == "gemma" and r["preview"][0]["rendered"].startswith(
        "<bos><start_of_turn>user\nTell me fact 0.<end_of_turn>")
    _, r = client.call("GET", "/api/inspect?path=datasets/qa.jsonl&base=models/tiny&template=auto&rows=1")
    assert r["template"] == "plain" and r["unit"] == "tokens"


def test_install_an_exported_adapter_as_an_expert_then_chat_bench_and_list(webui):  # noqa: F811
    client, app, ws = webui
    form = tiny_form("inst", steps=4)
    form["export"] = {"adapter": "inst.gguf", "outtype": "f16"}
    status, job = client.call("POST", "/api/train", form)
    assert status == 201, job
    status, conv = client.call("POST", "/api/export", {"kind": "gguf", "source": "models/tiny", "out": "tiny.gguf",
                                                       "outtype": "f32"})
    assert status == 201, conv
    assert client.wait(job["id"])["status"] == "done" and client.wait(conv["id"])["status"] == "done"
    # the exported Modelfile names its base portably, never this machine's path
    assert (ws / "exports" / "inst.Modelfile").read_text().splitlines()[0] == "FROM ./tiny"
    _, files = client.call("GET", "/api/files?path=exports")
    adapters = {f["path"]: f["adapter"] for f in files if f["path"].endswith(".gguf")}
    assert (adapters["exports/inst.gguf"], adapters["exports/tiny.gguf"]) == (True, False)

    status, d = client.call("GET", "/api/install?adapter=exports/inst.gguf")
    assert status == 200, d
    assert (d["name"], d["run"], d["base"], d["chat_format"]) == ("inst", "inst", "exports/tiny.gguf", "plain")
    assert d["examples"][:2] == ["Tell me fact 0.", "Tell me fact 1."] and "qa.jsonl" in d["description"]
    form = {k: d[k] for k in ("adapter", "name", "base", "chat_format", "description", "examples", "run")}
    for bad, field in ((dict(name="moe"), "reserved"), (dict(base=""), "base: choose"),
                       (dict(adapter="exports/tiny.gguf"), "not a LoRA adapter"), (dict(name="../x"), "name '../x'"),
                       (dict(chat_format="x"), "chat_format 'x'")):
        status, body = client.call("POST", "/api/install", {**form, **bad})
        assert status == 400 and field in body["error"], (bad, body)
    status, plan = client.call("POST", "/api/install/plan", form)
    assert status == 200 and 'base = "tiny"' in plan["toml"] and 'chat_format = "plain"' in plan["toml"]
    home = Path(os.environ["HUBLAB_HOME"])
    assert not (home / "models").exists()  # planning writes nothing
    status, r = client.call("POST", "/api/install", form)
    assert status == 201, r
    assert r["path"] == str(home / "models" / "experts" / "inst.toml")
    assert r["base_toml"] == str(home / "models" / "tiny.toml")
    assert (home / "models" / "experts" / "inst.gguf").read_bytes() == (ws / "exports" / "inst.gguf").read_bytes()
    status, body = client.call("POST", "/api/install", form)
    assert status == 409 and "tick replace" in body["error"]
    assert client.call("POST", "/api/install", {**form, "replace": True})[0] == 201

    _, models = client.call("GET", "/api/models")
    inst = next(m for m in models["models"] if m["name"] == "inst")
    assert inst["expert"] and inst["base"] == "tiny" and not models["errors"]
    question = [{"role": "user", "content": "Tell me fact 1."}]
    status, r = client.call("POST", "/api/chat", {"model": "inst", "messages": question, "max_tokens": 4})
    assert status == 200 and r["tokens"] >= 1, r
    # Evaluate runs on it with a dataset file as its questions
    (ws / "datasets" / "few.json").write_text(json.dumps([{"instruction": "Tell me fact 2.", "output": "x"}]))
    status, b = client.call("POST", "/api/bench", {"expert": "inst", "questions": "datasets/few.json", "max_tokens": 4})
    assert status == 201, b
    assert client.wait(b["id"], 120)["status"] == "done"
    assert client.call("GET", f"/api/jobs/{b['id']}/bench")[1]["rows"][0]["question"] == "Tell me fact 2."
    # and the shell lists it: one model set
    out = subprocess.run([sys.executable, "-m", "hublab.cli", "list", "--json"], capture_output=True, text=True,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert {"inst", "tiny", "python"} <= {m["name"] for m in json.loads(out.stdout)["models"]}


def test_modelfile_from_is_portable():
    from hublab.trainer.export import _portable_base
    from hublab.trainer.lora import CACHE_DIR

    cached = CACHE_DIR / "hf" / "gemma-3-270m-it-Q4_K_M-0123456789ab"  # lora.dequantized_dir's copy
    assert _portable_base(str(cached)) == "./gemma-3-270m-it-Q4_K_M.gguf"
    assert _portable_base("/home/me/models/tiny") == "./tiny" and _portable_base("gemma3-270m") == "gemma3-270m"
    assert _portable_base("") == "<base model GGUF>"
