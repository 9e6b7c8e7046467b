"""`hublab` command line. Each verb is one module exposing `add_arguments(parser)` and `cli(args)`.

The verb's module is imported only when that verb runs, so `hublab --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from . import __version__

# verb -> (module, one-line help). Modules keep heavy imports (llama.cpp, torch) inside functions.
COMMANDS: dict[str, tuple[str, str]] = {
    "shell": ("hublab.shell.repl", "open the hublab> shell (default when no verb is given)"),
    "run": ("hublab.runtime.run", "answer one prompt with an expert, or 'moe' for a routed answer"),
    "list": ("hublab.runtime.run", "list models and experts on disk"),
    "profile": ("hublab.runtime.engine.profiles", "show the active board profile (or all of them)"),
    "route": ("hublab.runtime.routing.router", "score a query against every expert without generating"),
    "serve": ("hublab.runtime.serve.agent", "run the HTTP device agent (OpenAI-compatible API)"),
    "rpc-worker": ("hublab.runtime.serve.rpc_worker", "lend this board to a base split across boards (llama.cpp RPC)"),
    "knowledge": ("hublab.runtime.routing.docs", "build a knowledge package from documentation (HTML, man, Markdown)"),
    "pkg": ("hublab.runtime.pkg.cli", "build, publish, install and verify model packages"),
    "deploy": ("hublab.runtime.pkg.deploy", "write an SD-card tree for a board"),
    "train": ("hublab.trainer.train", "train experts, routers and models (host, needs the train extra)"),
    "export": ("hublab.trainer.export", "export adapters/models to GGUF and quantize them"),
    "infer": ("hublab.trainer.train", "generate with trained multi-token heads (host, needs the train extra)"),
    "bench": ("hublab.trainer.bench", "A/B benchmark of an expert against its base"),
    "webui": ("hublab.trainer.webui", "the trainer in a browser: datasets, training, export, evaluation (train extra)"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line that quotes a bad value cut short (a 100 KB argument is
    not echoed back) and points at --help instead of printing the whole usage."""

    def error(self, message: str):
        if len(message) > 300:
            message = message[:300] + "... (cut)"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _profile_name(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        from hublab.runtime.inputs import quote

        raise argparse.ArgumentTypeError(f"{quote(text, 40)} is not a profile name (e.g. pi4-4gb; hublab profile "
                                         "--all lists them)")
    return text


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="hublab", description="A mixture of real expert language models on a Raspberry Pi.")
    parser.add_argument("--version", action="version", version=f"hublab {__version__}")
    parser.add_argument("--config", help="system.toml to use (default: $HUBLAB_CONFIG or ~/.config/hublab/system.toml)")
    parser.add_argument("--profile", type=_profile_name,
                        help="board profile to use instead of the detected one (e.g. pi4-4gb)")
    parser.add_argument("--verbose", action="store_true",
                        help="show llama.cpp's own log on stderr (default: appended to "
                             "~/.local/state/hublab/llama.log)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            mod = importlib.import_module(module)
            configure = getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments
            configure(p)
    return parser


def _find_verb(argv: list[str]) -> str | None:
    """The first positional argument, skipping the values of the global options that take one."""
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--config", "--profile"):
            skip = True
        elif not a.startswith("-"):
            return a
    return None


def _not_utf8(argv: list[str]) -> int | None:
    """The position of the first argument that was not UTF-8 (Python decodes argv with surrogateescape)."""
    from hublab.runtime.inputs import has_surrogates

    return next((i for i, a in enumerate(argv, 1) if has_surrogates(a)), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bad = _not_utf8(argv)
    if bad is not None:
        print(f"hublab: error: argument {bad} is not valid UTF-8 text; pass arguments as UTF-8", file=sys.stderr)
        return 2
    try:  # piped commands that are not UTF-8 reach the shell as lines it refuses, not as a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):
        pass
    verb = _find_verb(argv)
    if verb is None and not any(a in ("-h", "--help", "--version") for a in argv):
        argv.append("shell")
        verb = "shell"
    if verb is not None and verb in COMMANDS and not _available(COMMANDS[verb][0]):
        print(f"hublab: error: '{verb}' is not available in this build yet", file=sys.stderr)
        return 2
    from hublab.runtime.errors import HublabError

    try:
        parser = build_parser(verb if verb in COMMANDS else None)
        args = parser.parse_args(argv)
        if args.config:
            os.environ["HUBLAB_CONFIG"] = args.config
        if args.verbose:
            os.environ["HUBLAB_VERBOSE"] = "1"  # read where llama.cpp is loaded (runtime/engine/llama_log.py)
        module = importlib.import_module(COMMANDS[args.verb][0])
        handler = getattr(module, f"{args.verb}_cli", None) or module.cli
        return int(handler(args) or 0)
    except HublabError as exc:
        from hublab.runtime.inputs import clip_message

        print(f"hublab: error: {clip_message(str(exc))}", file=sys.stderr)
        return 1
    except UnicodeError as exc:  # text that is not UTF-8 where a verb reads it (a file, a pipe)
        print(f"hublab: error: input is not valid UTF-8 text ({exc.__class__.__name__} at position "
              f"{getattr(exc, 'start', '?')}); give UTF-8", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `hublab list | head`: the reader left; stop quietly like other Unix tools
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
