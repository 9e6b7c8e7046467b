"""Bad command-line input: hostile arguments to `hublab` and hostile lines to the `hublab>` shell are one
line on stderr (no traceback, no "internal error"), quote at most a few characters of a huge value, and
leave system.toml as it was. Invalid UTF-8 in argv or on stdin is refused the same way."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hublab.cli import main

HUBLAB = str(Path(sys.executable).parent / "hublab")
HUGE = "9" * 100_000  # a 100 KB argument (one argv string may hold at most 128 KB)


@pytest.fixture
def device_env(tmp_path, tiny_models_dir, monkeypatch):
    config = tmp_path / "system.toml"
    config.write_text(f'[runtime]\nmodels_dir = "{tiny_models_dir}"\nprofile = "host"\n\n[moe]\nfallback = "plain"\n',
                      encoding="utf-8")
    monkeypatch.setenv("HUBLAB_CONFIG", str(config))
    monkeypatch.setenv("HUBLAB_HOME", str(tmp_path / "home"))
    return config


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[:500]
    assert "Traceback" not in err and "internal error" not in err, err[:500]
    assert len(lines[0]) < 600, lines[0][:200]
    return lines[0]


ARGV_BAD = [
    ["serve", "--port", "70000"], ["serve", "--port", "-1"], ["serve", "--port", "abc"], ["serve", "--port", HUGE],
    ["serve", "--queue-size", "0"], ["serve", "--queue-size", "-1"], ["serve", "--queue-size", "1.5"],
    ["serve", "--queue-size", HUGE],
    *[["run", "moe", "x", "--temperature", v] for v in ("-1", "nan", "inf", "-inf", "1e999", "6", "hot", HUGE)],
    *[["run", "moe", "x", "--max-tokens", v] for v in ("-5", "0", "nan", "1.5", "inf", HUGE)],
    ["run", "moe", "   "], ["run", "moe", ""], ["run", "moe", "\t\n"],
    ["run", "moe", "x", "--synthesis", "nope"], ["run", "moe", "x", "--synthesis", "x" * 100_000],
    ["run", "moe", "x", "--routing", "topk:0"], ["run", "moe", "x", "--routing", "r" * 100_000],
    ["run", "nope", "x"], ["run", "n" * 100_000, "x"],
    ["shell", "--remote", "http://[::1", "-c", "ai list"], ["shell", "--remote", "http://h:70000", "-c", "ai list"],
    ["shell", "--remote", "ftp://x", "-c", "ai list"], ["shell", "--remote", "http://", "-c", "ai list"],
    ["shell", "--remote", "u" * 100_000, "-c", "ai list"], ["shell", "--remote", "http://h:abc", "-c", "x"],
    ["run", "\udcff\udcfe", "x"], ["shell", "-c", "?\udcff"], ["--config", "\udcffx", "list"],
    ["--profile", "\udcff", "list"], ["nonsense-verb"], ["x" * 100_000], ["run"], ["serve", "--bogus"],
    ["--profile", "no-such-board", "list"], ["--profile", "p" * 100_000, "list"],
]


@pytest.mark.parametrize("argv", ARGV_BAD, ids=[" ".join(a)[:40].encode("ascii", "replace").decode() for a in ARGV_BAD])
def test_bad_arguments_are_one_line(device_env, capsys, argv):
    before = device_env.read_bytes()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    assert code not in (0, None)
    one_line_error(capsys.readouterr().err)
    assert device_env.read_bytes() == before


SHELL_BAD = [
    "ai config temperature -1", "ai config temperature nan", "ai config keyword_weight inf",
    "ai config sure NaN", "ai config max_tokens -3", "ai config queue_size 0", "ai config port 70000",
    "ai config keep_alive inf", "ai config threads -1", "ai config models_dir /nonexistent/models",
    "ai config routing topk:0", "ai config synthesis nope", "ai config max_memory -5",
    "ai config alpha temperature nan", "ai config alpha top_p 7", "ai config alpha seed -9",
    f"ai config temperature {HUGE}", f"ai config {HUGE} 1", f"ai config alpha {HUGE} 1",
    "?", "?   ", "? ''", "moe route", "moe route \"   \"", "moe query", "moe nothing", f"moe {HUGE}",
    HUGE, "x" * 100_000, f"ai {HUGE}", f"ai load {HUGE}", "ai load nope", "ai info nope", "ai unload",
    f"settings moe routing={HUGE}", "settings moe routing=topk:0", "settings moe synthesis=nope",
    f"settings {HUGE}", "settings moe routing", f"help {HUGE}", "history -1", "history x",
    'ai config "unterminated', "pkg", "pkg install", f"pkg install {HUGE}", "pkg install UPPER!",
    "ai benchmark nope", "ai info a b",
]


@pytest.mark.parametrize("line", SHELL_BAD, ids=[s[:40] for s in SHELL_BAD])
def test_bad_shell_lines_are_one_line(device_env, capsys, line):
    before = device_env.read_bytes()
    code = main(["shell", "-c", line])
    captured = capsys.readouterr()
    assert code == 1
    assert one_line_error(captured.err).startswith(("error:", "hublab: error:"))
    assert device_env.read_bytes() == before


def test_invalid_utf8_on_stdin_is_a_line_refused_and_the_rest_runs(device_env):
    p = subprocess.run([HUBLAB, "shell"], input=b"version\n\xff\xfe ai list\n?\xc3\nversion\n", capture_output=True,
                       timeout=120)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 1 and "Traceback" not in err and "internal error" not in err, err
    assert err.count("not valid UTF-8") == 2
    assert p.stdout.decode().count("hublab 0.1") == 2  # both good lines ran


def test_invalid_utf8_in_argv_is_one_line(device_env):
    p = subprocess.run([HUBLAB.encode(), b"run", b"moe", b"\xff\xfe"], capture_output=True, timeout=120)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2 and "not valid UTF-8" in one_line_error(err)


def test_json_mode_error_is_one_short_document(device_env, capsys):
    import json

    assert main(["shell", "--json", "-c", "x" * 100_000]) == 1
    out = capsys.readouterr().out.strip()
    doc = json.loads(out)
    assert doc["ok"] is False and len(out) < 800 and len(doc["command"]) <= 43
