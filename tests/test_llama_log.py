"""llama.cpp's log: never on the shell's stdout/stderr unless --verbose; kept in the state dir's llama.log."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ggufs import write_model_toml

from hublab.runtime.config import EMBEDDED_MODELS_DIR

HUBLAB = str(Path(sys.executable).parent / "hublab")
# What llama.cpp's lines start with (function-name prefixes), and its lines about LoRA adapters.
LLAMA_LINE = re.compile(r"^(llama_|load_tensors|print_info|ggml_|gguf_|create_tensor|graph_reserve|repack|"
                        r"llm_load|clip_|\.+$)|lora|model buffer size", re.M)


@pytest.fixture
def env(tmp_path, gemma_gguf) -> dict:
    """The real base with a demo adapter (where the weights are repacked, loading the adapter makes llama.cpp warn
    once per tensor; on hosts that keep plain buffers it does not)."""
    models = tmp_path / "models"
    (models / "experts").mkdir(parents=True)
    write_model_toml(models / "gemma.toml", "gemma", gguf_path=gemma_gguf, context_size=256)
    for name in ("python", "rust"):
        write_model_toml(models / "experts" / f"{name}.toml", name, base="gemma",
                         adapter=EMBEDDED_MODELS_DIR / "demo" / f"{name}.gguf")
    config = tmp_path / "system.toml"
    config.write_text(f'[runtime]\nmodels_dir = "{models}"\nprofile = "host"\nthreads = 1\n\n'
                      '[moe]\nfallback = "python"\n')
    e = {**os.environ, "HUBLAB_CONFIG": str(config), "HUBLAB_HOME": str(tmp_path / "home"), "TERM": "dumb"}
    e.pop("HUBLAB_VERBOSE", None)
    return e


def hublab(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HUBLAB, *args], env=env, capture_output=True, text=True, timeout=120)


def test_shell_and_run_show_no_llama_lines(env):
    shell = hublab(env, "shell", "-c", "ai load python")
    run = hublab(env, "run", "rust", "hello", "--max-tokens", "2")
    for p in (shell, run):
        assert p.returncode == 0, p.stderr
        assert not LLAMA_LINE.search(p.stdout), p.stdout
        assert not LLAMA_LINE.search(p.stderr), p.stderr
    assert "python" in shell.stdout
    log = (Path(env["HUBLAB_HOME"]) / "llama.log").read_text()
    assert "llama_model_loader" in log and "model buffer size" in log  # the lines went to the log file instead
    assert not re.search(r"^create_tensor", log, re.M)  # debug lines only with --verbose


def test_verbose_shows_llama_lines_on_stderr(env):
    p = hublab(env, "--verbose", "run", "python", "hello", "--max-tokens", "2")
    assert p.returncode == 0, p.stderr
    assert "llama_model_loader" in p.stderr and "model buffer size" in p.stderr
    assert not LLAMA_LINE.search(p.stdout), p.stdout
