"""Where llama.cpp's log goes: a file under the state dir, or stderr with --verbose.

llama.cpp logs through one process-wide callback (model loading, one "lora ... fallback to CPU" line per
adapter tensor, ...). By default the shell and the CLI show the answer and hublab's own lines only, and
llama.cpp's lines are appended to `state_home()/llama.log` for when something goes wrong.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from pathlib import Path

from ..paths import state_home

LOG_NAME = "llama.log"
# enum ggml_log_level in the pinned llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama-cpp-python's
# own callback still reads the older order, which is why WARN lines reached the shell)
GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_CONT = 1, 2, 5
MAX_BYTES = 4 << 20  # past this the log starts over, keeping one older file (llama.log.1)

_lock = threading.Lock()
_compute: list[float] = []  # MiB of each compute buffer llama.cpp reserved (read off its log), newest last
_captures: list[list[str]] = []  # lines of llama.cpp's log wanted by a `capture` running now
_callback = None  # ctypes keeps no reference of its own: without this one the callback is freed under C
_sink = None


def verbose() -> bool:
    """--verbose (or HUBLAB_VERBOSE=1, which the CLI sets so subprocesses follow)."""
    return os.environ.get("HUBLAB_VERBOSE", "") not in ("", "0")


def log_path() -> Path:
    return state_home() / LOG_NAME


def _open_log() -> object:
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size > MAX_BYTES:
            os.replace(path, path.with_name(LOG_NAME + ".1"))
        return path.open("a", encoding="utf-8", errors="replace", buffering=1)
    except OSError:
        return None  # an unwritable state dir must not stop an answer: the lines are dropped


def compute_buffers() -> int:
    """How many compute-buffer sizes were logged so far (a mark for `compute_since`)."""
    return len(_compute)


def compute_since(mark: int) -> int:
    """Bytes of the compute buffers llama.cpp reserved since `mark` (0 when its log said nothing)."""
    return int(sum(_compute[mark:]) * (1 << 20))


def install() -> None:
    """Route llama.cpp's log (call before loading a model; again is a no-op)."""
    global _callback, _sink
    with _lock:
        if _callback is not None:
            return
        import llama_cpp

        loud = verbose()
        _sink = sys.stderr if loud else _open_log()

        last = [GGML_LOG_LEVEL_INFO]

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level != GGML_LOG_LEVEL_CONT:
                last[0] = level
            if b"compute buffer size" in text:  # "sched_reserve: CPU compute buffer size = 64.31 MiB"
                try:
                    _compute.append(float(text.rsplit(b"=", 1)[1].split()[0]))
                except (IndexError, ValueError):
                    pass
            if _captures and last[0] != GGML_LOG_LEVEL_DEBUG:
                for lines in _captures:
                    lines.append(text.decode("utf-8", errors="replace"))
            # debug lines (one per tensor and graph input, ~200 KB per model load) only with --verbose:
            # a Pi's SD card should not take them on every start
            if _sink is None or (last[0] == GGML_LOG_LEVEL_DEBUG and not loud):
                return
            try:
                _sink.write(text.decode("utf-8", errors="replace"))
            except (OSError, ValueError):
                pass  # a full disk or a closed stream: llama.cpp must go on

        _callback = callback
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def capture():
    """The lines llama.cpp logs meanwhile (not debug ones), and what it writes straight to stderr (its grammar
    parser says what is wrong there), for an error message that says what it said. Lines other threads cause
    may be among them; keep what runs inside short."""
    import tempfile

    install()
    lines: list[str] = []
    with _lock:
        _captures.append(lines)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as err:
        os.dup2(err.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            with _lock:
                _captures.remove(lines)
            err.seek(0)
            lines[:0] = err.read(8192).decode("utf-8", errors="replace").splitlines()
