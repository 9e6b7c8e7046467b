"""`hublab shell`: the `hublab>` prompt, one command with -c, or commands piped on stdin.

At a terminal: prompt-toolkit with history saved across runs, tab completion of commands, expert and
package names, streaming answers; Ctrl-C stops the running answer (not the shell), Ctrl-D or `exit`
leaves. With -c or piped input there is no prompt; `--json` prints exactly one JSON document per command.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from hublab import __version__

from .commands import AI_SUBCOMMANDS, COMMANDS, Result, Session, command_name, envelope, execute


def history_path() -> Path:
    """$HUBLAB_HOME/history, else $XDG_STATE_HOME/hublab/history (~/.local/state/hublab/history)."""
    home = os.environ.get("HUBLAB_HOME")
    if home:
        return Path(home) / "history"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "hublab" / "history"


def add_arguments(parser) -> None:
    parser.add_argument("-c", dest="command", metavar="COMMAND", help="run one command (e.g. \"ai list\") and exit")
    parser.add_argument("--json", action="store_true", help="print each command's result as one JSON document")
    parser.add_argument("--remote", metavar="URL", help="drive a device agent (hublab serve) at URL instead of "
                                                         "this machine's runtime")
    parser.add_argument("--token", help="bearer token for --remote (default: $HUBLAB_TOKEN)")


@contextlib.contextmanager
def ctrl_c_stops(s: Session):
    """While a command runs, Ctrl-C sets the session's cancel event (the answer stops at the next token);
    a second Ctrl-C interrupts outright."""
    def handler(signum, frame):
        if s.cancel.is_set():
            raise KeyboardInterrupt
        s.cancel.set()

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def run_one(s: Session, line: str) -> tuple[bool, Result | None]:
    """Run a line and print its result; an error prints one line and returns (False, None)."""
    from hublab.runtime.errors import HublabError

    try:
        with ctrl_c_stops(s):
            result = execute(s, line)
    except HublabError as exc:
        s.end_line()
        _print_error(s, line, str(exc))
        return False, None
    except KeyboardInterrupt:
        s.end_line()
        _print_error(s, line, "interrupted")
        return False, None
    except Exception as exc:  # noqa: BLE001 - a bug in one command must not end the session
        if os.environ.get("HUBLAB_DEBUG"):
            raise
        s.end_line()
        _print_error(s, line, f"internal error {exc.__class__.__name__}: {exc} (a bug; rerun with HUBLAB_DEBUG=1 "
                              "for the traceback and report it)")
        return False, None
    s.end_line()
    if s.json:
        print(envelope(result.command, result), flush=True)
    elif result.text:
        print(result.text, flush=True)
    if s.cancel.is_set() and not s.json and result.command != "exit":
        print("[stopped]", flush=True)
    return True, result


def _print_error(s: Session, line: str, message: str) -> None:
    if s.json:
        print(envelope(command_name(line), error=message), flush=True)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)


def run_lines(s: Session, lines) -> int:
    """Commands from a pipe or file: one per line; blank lines and # comments are skipped."""
    ok = True
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        good, result = run_one(s, line)
        ok &= good
        if result is not None and result.command == "exit":
            break
    return 0 if ok else 1


def make_completer(s: Session):
    from prompt_toolkit.completion import Completer, Completion

    from hublab.runtime.config import SYSTEM_SCHEMA
    from hublab.runtime.serve.device import INFERENCE_KEYS, SYSTEM_KEYS

    routings = ["topk:1", "topk:2", "topk:3", "threshold:0.3", "single", "all"]
    syntheses = list(SYSTEM_SCHEMA["moe"]["synthesis"].choices)
    pkg_subs = ["install", "remove", "list", "search", "show", "update", "verify", "build", "publish", "keygen"]
    config_keys, model_keys = list(SYSTEM_KEYS), list(INFERENCE_KEYS)  # what `ai config [NAME] KEY` takes

    class ShellCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if text.lstrip().startswith("?"):
                return
            words = text.split()
            if text.endswith(" ") or not words:
                words.append("")
            word, done = words[-1], words[:-1]
            for cand in self.candidates(done):
                if cand.startswith(word) and cand != word:
                    yield Completion(cand, start_position=-len(word))

        def candidates(self, done: list[str]) -> list[str]:
            if not done:
                return list(COMMANDS) + ["quit"]
            head, n = done[0], len(done)
            if head == "help" and n == 1:
                return list(COMMANDS)
            if head == "ai":
                if n == 1:
                    return AI_SUBCOMMANDS
                sub = done[1]
                if sub in ("load", "unload", "info", "benchmark") and n == 2:
                    return s.names()
                if sub == "config" and n == 2:
                    return s.names() + config_keys
                if sub == "config" and n == 3 and done[2] in s.names():
                    return model_keys
            if head == "moe" and n == 1:
                return ["route", "query"]
            if head == "settings":
                if n == 1:
                    return ["moe", "format=json", "format=text"]
                return [f"routing={r}" for r in routings] + [f"synthesis={x}" for x in syntheses]
            if head == "pkg":
                if n == 1:
                    return pkg_subs
                if done[1] in ("remove", "show", "update", "verify"):
                    return s.packages()
            return []

    return ShellCompleter()


def interactive(s: Session) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.history import FileHistory

    s.interactive = True
    path = s.history_path
    history = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(path))
    prompt = PromptSession(history=history, completer=make_completer(s), auto_suggest=AutoSuggestFromHistory(),
                           complete_while_typing=False)
    where = getattr(s.client, "url", None) or "this machine"
    print(f"hublab {__version__} on {where}. Type help for commands, ?question to ask; Ctrl-D leaves.", flush=True)
    while True:
        try:
            line = prompt.prompt("hublab> ")
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line, as in bash
        except EOFError:
            break
        if not line.strip():
            continue
        _, result = run_one(s, line)
        if result is not None and result.command == "exit":
            break
    return 0


def cli(args) -> int:
    from .client import connect

    client = connect(args.remote, token=args.token, profile=getattr(args, "profile", None))
    s = Session(client, json=args.json, history_path=history_path())
    try:
        if args.command is not None:
            ok, _ = run_one(s, args.command)
            return 0 if ok else 1
        if not sys.stdin.isatty():
            return run_lines(s, sys.stdin)
        return interactive(s)
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        client.close()

