"""The hublab> shell, used as people and scripts use it: every command through `hublab shell -c --json`,
text output, piped input, `--remote` against a real agent, and an interactive session in a real
terminal (pexpect): typing, tab completion, Ctrl-C during an answer, Ctrl-D, history across runs."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pexpect
import pytest

from hublab import __version__
from hublab.runtime.config import load_system
from test_agent import HUBLAB, long_gguf, start_agent, write_device  # noqa: F401 - long_gguf is a fixture

MODELS = {"alpha", "beta", "gamma", "plain", "slow", "tiny"}


@pytest.fixture
def env(tmp_path, tiny_gguf, tiny_adapters, long_gguf) -> dict:
    config = write_device(tmp_path, tiny_gguf, tiny_adapters, long_gguf)
    # pexpect's terminal does not answer cursor-position requests; tell prompt-toolkit not to ask
    e = {**os.environ, "HUBLAB_CONFIG": str(config), "HUBLAB_HOME": str(tmp_path / "home"), "TERM": "xterm",
         "PROMPT_TOOLKIT_NO_CPR": "1"}
    e.pop("HUBLAB_TOKEN", None)
    return e


def shell(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([HUBLAB, "shell", *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)


def run_json(env: dict, command: str, *extra: str) -> tuple[int, dict]:
    p = shell(env, *extra, "--json", "-c", command)
    lines = p.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON document, got {p.stdout!r} / {p.stderr!r}"
    assert "Traceback" not in p.stderr
    return p.returncode, json.loads(lines[0])


def config_of(env: dict):
    return load_system(Path(env["HUBLAB_CONFIG"]))


# Every command through -c --json: (command line, check of the result document).
CASES = {
    "ai list": lambda r, e: {m["name"] for m in r["models"]} == MODELS and not any(m["loaded"] for m in r["models"]),
    "ai load alpha": lambda r, e: r["loaded"] == ["tiny", "alpha"] and r["used"] > 0,
    "ai unload beta": lambda r, e: r["unloaded"] == [],
    "ai info": lambda r, e: r["profile"] == "host" and r["threads"] == 1 and r["experts"] == 5,
    "ai info alpha": lambda r, e: r["base"] == "tiny" and r["quant"] == "F32" and r["context_size"] == 256
    and r["keywords"] == ["python", "pip"],
    "ai config keep_alive 10m": lambda r, e: config_of(e).keep_alive == 600 and r["applies"] == "now",
    "ai config alpha temperature 0.5": lambda r, e: "temperature = 0.5" in Path(r["saved_to"]).read_text(),
    "ai stats": lambda r, e: r["experts"] == {} and r["memory"]["budget"] > 0,
    "ai benchmark beta": lambda r, e: r["name"] == "beta" and r["tokens"] == 64 and r["tokens_per_s"] > 0
    and r["prompt_tokens_per_s"] > 0,
    'moe route "how do I publish a crate with cargo?"':
        lambda r, e: [c["name"] for c in r["selected"]] == ["beta"] and len(r["scores"]) == 5,
    'moe query "linux kernel modules"': lambda r, e: r["selected"][0]["name"] == "gamma" and r["answer"].strip(),
    "?how do I use pip": lambda r, e: r["chosen"] == "alpha" and r["answer"].strip() and r["timings"]["total_s"] > 0,
    "settings moe": lambda r, e: (r["routing"], r["synthesis"], r["fallback"]) == ("topk:2", "best", "plain"),
    "settings moe routing=topk:1 synthesis=concatenate":
        lambda r, e: (config_of(e).routing, config_of(e).synthesis) == ("topk:1", "concatenate"),
    "pkg list": lambda r, e: r == [],
    "help": lambda r, e: {c["command"] for c in r["commands"]} >= {"?", "ai", "moe", "settings", "pkg", "help",
                                                                   "history", "clear", "version", "exit"},
    "help ai": lambda r, e: "ai benchmark" in r["details"],
    "history": lambda r, e: r["entries"] == [],
    "clear": lambda r, e: r == {"cleared": False},
    "version": lambda r, e: r["hublab"] == __version__ and r["llama_cpp_python"],
    "exit": lambda r, e: r == {"exit": True},
}


@pytest.mark.parametrize("command", list(CASES))
def test_every_command_with_json(env, command):
    code, doc = run_json(env, command)
    assert code == 0 and doc["ok"], doc
    words = command.split()
    expected = "?" if command.startswith("?") else " ".join(words[:2]) if words[0] in ("ai", "moe", "pkg") else words[0]
    assert doc["command"] == expected
    assert CASES[command](doc["result"], env), doc


@pytest.mark.parametrize("command, needle", [
    ("bogus", "type help"),
    ("ai lod alpha", "did you mean 'ai load'"),
    ("ai load alpah", "did you mean 'alpha'"),
    ("ai config temperature hot", "not a number"),
    ("ai config alpha temperature hot", "not a number"),
    ("settings moe routing=topk:x", "topk"),
    ("settings moe synthesis=average", "best"),
    ('moe route ""', "needs a question"),
    ("pkg frobnicate", "invalid choice"),
])
def test_errors_are_one_line_with_a_hint_and_change_nothing(env, command, needle):
    before = Path(env["HUBLAB_CONFIG"]).read_text()
    code, doc = run_json(env, command)
    assert code == 1 and not doc["ok"] and needle in doc["error"] and "\n" not in doc["error"]
    assert Path(env["HUBLAB_CONFIG"]).read_text() == before
    p = shell(env, "-c", command)  # the same in text: one line on stderr
    assert p.returncode == 1 and p.stdout == "" and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


def test_text_output_shows_progress_and_experts(env):
    p = shell(env, "-c", 'moe query "python pip and rust cargo"')
    assert p.returncode == 0, p.stderr
    out = p.stdout
    router, expert_a, expert_b, synth = (out.index("[Router] topk:2"), out.index("[Expert] alpha"),
                                         out.index("[Expert] beta"), out.index("[Synthesizer] best"))
    assert router < expert_a < expert_b < synth and "tok/s" in out
    p = shell(env, "-c", "?what is a kernel in linux")
    assert p.stdout.startswith("[gamma 1.00]") and "chosen gamma" in p.stdout
    p = shell(env, "-c", "ai list")
    assert re.search(r"^alpha\s+expert\s+tiny\s+F32", p.stdout, re.M) and "budget" in p.stdout


def test_piped_commands_run_in_order_without_a_prompt(env):
    script = "# a comment\nai load alpha\n\nai list\nbogus\nai unload tiny\nexit\nai list\n"
    p = shell(env, stdin=script)
    assert "hublab>" not in p.stdout and p.returncode == 1  # one command failed
    assert p.stdout.startswith("loaded alpha") and "unloaded tiny, alpha" in p.stdout
    assert p.stdout.count("NAME") == 1  # nothing runs after exit
    assert p.stderr.strip() == "error: unknown command 'bogus'; type help for the list"

    p = shell(env, "--json", stdin="ai load alpha\nai unload tiny\nsettings moe\n")
    docs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [d["command"] for d in docs] == ["ai load", "ai unload", "settings"] and p.returncode == 0
    assert set(docs[1]["result"]["unloaded"]) == {"tiny", "alpha"}


def test_remote_shell_drives_an_agent(env):
    agent = start_agent(Path(env["HUBLAB_CONFIG"]), token="tok")
    try:
        remote = ("--remote", agent.url, "--token", "tok")
        code, doc = run_json(env, "ai list", *remote)
        assert code == 0 and {m["name"] for m in doc["result"]["models"]} == MODELS
        code, doc = run_json(env, "ai load beta", *remote)
        assert doc["result"]["loaded"] == ["tiny", "beta"] and agent.device.rt.loaded() == ["tiny", "beta"]
        code, doc = run_json(env, "?cargo build for rust", *remote)
        assert doc["result"]["chosen"] == "beta" and agent.device.rt.stats["beta"].calls == 1
        code, doc = run_json(env, 'moe route "linux"', *remote)
        assert doc["result"]["selected"][0]["name"] == "gamma"
        code, doc = run_json(env, "settings moe routing=all", *remote)
        assert doc["result"]["routing"] == "all" and config_of(env).routing == "all"
        code, doc = run_json(env, "ai info beta", *remote)
        assert doc["result"]["loaded"] and doc["result"]["base"] == "tiny"
        code, doc = run_json(env, "version", *remote)
        assert doc["result"]["where"] == agent.url
        p = shell(env, *remote, "-c", "moe query python pip")
        assert "[Router] all" in p.stdout and "[Expert] alpha" in p.stdout and "[Synthesizer] best" in p.stdout
        code, doc = run_json(env, "pkg list", *remote)
        assert code == 1 and "not over --remote" in doc["error"]
        code, doc = run_json(env, "ai list", "--remote", agent.url, "--token", "wrong")
        assert code == 1 and "401" in doc["error"]
    finally:
        agent.stop()
        agent.device.close()
    code, doc = run_json(env, "ai list", *remote)  # agent gone: one line saying how to fix it
    assert code == 1 and "hublab serve" in doc["error"]


def test_tab_completion_offers_every_setting_ai_config_takes(env):
    """The keys come from the settings table: [moe] sure and aggregator too (issue 27), a model's sampler keys
    after its name."""
    from prompt_toolkit.document import Document

    from hublab.runtime.serve.device import INFERENCE_KEYS, SYSTEM_KEYS, Device
    from hublab.shell.commands import Session
    from hublab.shell.repl import make_completer

    device = Device.open(env["HUBLAB_CONFIG"])
    try:
        completer = make_completer(Session(client=device))

        def offered(text: str) -> set[str]:
            return {c.text for c in completer.get_completions(Document(text), None)}

        assert offered("ai config ") == set(SYSTEM_KEYS) | MODELS and {"sure", "aggregator"} <= offered("ai config ")
        assert offered("ai config alpha ") == set(INFERENCE_KEYS) and "stop" in offered("ai config alpha ")
        assert offered("ai config agg") == {"aggregator"}
    finally:
        device.close()


def test_interactive_session_in_a_terminal(env):
    home = Path(env["HUBLAB_HOME"])
    child = pexpect.spawn(HUBLAB, ["shell"], env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    try:
        child.expect("Type help")
        child.expect("hublab>")
        child.sendline("ai list")
        child.expect(r"slow\s+expert")
        child.expect("hublab>")
        # tab completion of the subcommand and of the expert name
        child.send("ai lo\t")
        child.send(" alp\t")
        child.send("\r")
        child.expect("loaded alpha in")
        child.expect("hublab>")
        child.sendline("bogus")
        child.expect("error: unknown command 'bogus'")
        child.expect("hublab>")
        # Ctrl-C during an answer stops the answer, not the shell
        child.sendline("?tell me a long story")
        child.expect(r"\[slow 1\.00\]\r\n *[a-z]+ [a-z]+ ")  # a single expert's words stream as they come
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("hublab>")
        child.sendline("ai stats")
        child.expect(r"slow\s+1\s+\d+\s+(\d+)")
        assert int(child.match.group(1)) < 3000
        child.expect("hublab>")
        child.sendintr()  # Ctrl-C at the prompt just clears the line
        child.expect("hublab>")
        child.sendline("version")
        child.expect(f"hublab {__version__}")
        child.expect("hublab>")
        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    # history is saved and read back by the next run
    code, doc = run_json(env, "history")
    assert doc["result"]["entries"] == ["ai list", "ai load alpha", "bogus", "?tell me a long story", "ai stats",
                                        "version"]
    assert doc["result"]["file"] == str(home / "history")

    child = pexpect.spawn(HUBLAB, ["shell"], env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    try:
        child.expect("hublab>")
        child.sendline("history 2")  # like bash, the list ends with the history command itself
        child.expect(r"6\s+version")
        child.expect(r"7\s+history 2")
        child.expect("hublab>")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_remote_ctrl_c_closes_the_stream_and_the_agent_stops(env):
    import threading

    from hublab.shell.client import RemoteClient
    from test_agent import metric, wait_for

    agent = start_agent(Path(env["HUBLAB_CONFIG"]))
    client = RemoteClient(agent.url)
    try:
        cancel = threading.Event()
        kinds = []

        def on_event(kind, data):  # what the shell's Ctrl-C handler does: set the event mid-answer
            kinds.append(kind)
            if kind == "expert_token" and kinds.count("expert_token") == 3:
                cancel.set()

        result = client.ask("tell me a story", on_event=on_event, cancel=cancel)
        assert result["finish_reason"] == "cancelled" and "done" not in kinds
        wait_for(lambda: agent.gate.running == 0, what="the agent to stop generating")
        assert agent.device.rt.stats["slow"].tokens < 3000
        assert metric(agent, "hublab_cancelled_total") == 1
    finally:
        client.close()
        agent.stop()
        agent.device.close()
