"""The `hublab>` commands: each parses its words, calls the client (local Device or remote agent) and
returns a `Result`: the data (what `--json` prints) and the text a person reads. Output that streams
(answers, expert progress) is written as it arrives through `Session.write`.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import shlex
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hublab.runtime.config import format_size
from hublab.runtime.errors import HublabError
from hublab.runtime.inputs import clip_message, has_surrogates, quote

from .client import Client


class CommandError(HublabError):
    """A command was typed wrong; the message says how to type it."""


@dataclass
class Result:
    command: str
    data: Any
    text: str = ""


@dataclass
class Session:
    """One shell: the client, how to print, the Ctrl-C event of the running command, the history file."""
    client: Client
    json: bool = False
    out: Any = None
    history_path: Path | None = None
    interactive: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    line_open: bool = False   # streamed text ended mid-line
    _names: list[str] | None = None
    _packages: list[str] | None = None
    format: Any = None        # what `?` answers keep to: "json", a JSON schema (settings format=...), or None
    format_name: str = "text"

    def write(self, text: str) -> None:
        """Streamed output: shown as it comes, except in --json mode (one document at the end)."""
        if not self.json and text:
            out = self.out or sys.stdout
            out.write(text)
            out.flush()
            self.line_open = not text.endswith("\n")

    def end_line(self) -> None:
        """Close a line that streaming left open, so what follows starts at the left edge."""
        if self.line_open:
            self.write("\n")

    @property
    def local(self) -> bool:
        return self.client.local

    def names(self) -> list[str]:
        """Model and expert names, for completion (cached; refreshed after load/unload/pkg)."""
        if self._names is None:
            try:
                self._names = list(self.client.names())
            except HublabError:
                self._names = []
        return self._names

    def packages(self) -> list[str]:
        if self._packages is None:
            self._packages = []
            if self.local:
                from hublab.runtime import pkg

                with contextlib.suppress(HublabError, OSError):
                    self._packages = [p.name for p in pkg.list_packages()]
        return self._packages

    def forget(self) -> None:
        self._names = self._packages = None


# ---------------------------------------------------------------------------------------------------
# Formatting

def _size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _where(row: dict) -> str:
    """Where an expert runs: here, or its peer and whether that board is up."""
    where = row.get("where") or "here"
    if where == "here":
        return where
    return f"{where} " + ("up" if row.get("up") else "down" if row.get("up") is False else "?")


def _scores(selected: list[dict]) -> str:
    return ", ".join(f"{c['name']} {c['score']:.2f}" for c in selected)


def _question(rest: str) -> str:
    """The text after a command, with one pair of surrounding quotes removed."""
    q = rest.strip()
    if len(q) >= 2 and q[0] == q[-1] and q[0] in "\"'":
        q = q[1:-1].strip()
    return q


# ---------------------------------------------------------------------------------------------------
# Commands

def cmd_ask(s: Session, words: list[str], rest: str) -> Result:
    query = _question(rest)
    if not query:
        raise CommandError("empty question; type it right after ?, e.g. ?what is a list comprehension")
    show = Progress(s, verbose=False)
    data = s.client.ask(query, on_event=show, cancel=s.cancel, format=s.format)
    show.finish(data)
    return Result("?", data)


def cmd_moe(s: Session, words: list[str], rest: str) -> Result:
    sub = words[1] if len(words) > 1 else ""
    if sub not in ("route", "query"):
        raise CommandError("usage: moe route \"<question>\" | moe query \"<question>\" (got "
                           f"{quote(sub) if sub else 'nothing'})")
    query = _question(rest.split(None, 1)[1] if len(rest.split(None, 1)) > 1 else "")
    if not query:
        raise CommandError(f"moe {sub} needs a question, e.g. moe {sub} \"how do I read a file in python?\"")
    if sub == "route":
        d = s.client.route(query)
        chosen = {c["name"] for c in d["selected"]}
        def sim(sc: dict) -> str:
            return "-" if sc.get("similarity") is None else f"{sc['similarity']:.2f}"

        where = d.get("where") or {}
        rows = [[("* " if sc["expert"] in chosen else "  ") + sc["expert"], f"{sc['score']:.3f}",
                 f"{sc['model_score']:.3f}", f"{sc.get('head_score', sc['model_score']):.3f}",
                 f"{sc.get('example_score', 0.0):.3f}", sim(sc), f"{sc['keyword_score']:.3f}",
                 _where(where.get(sc["expert"], {})), ", ".join(sc.get("keywords") or [])]
                for sc in d["scores"]]
        text = _table(rows, ["  EXPERT", "SCORE", "MODEL", "HEAD", "EXAMPLES", "SIM", "KEYWORDS", "WHERE", "MATCHED"])
        text += f"\nrouting {d['routing']}: selected {_scores(d['selected'])}"
        if d.get("fallback"):
            text += " (fallback: nothing passed the strategy)"
        if d.get("note"):
            text += f"\nnote: {d['note']}"
        return Result("moe route", d, text)
    show = Progress(s, verbose=True)
    data = s.client.ask(query, on_event=show, cancel=s.cancel, format=s.format)
    show.finish(data)
    return Result("moe query", data)


class Progress:
    """Prints Ensemble events. `moe query` shows every step; `?` shows the experts and then the answer, streaming
    the expert's own words when a single expert answers. An answer that is one of the answers already on
    screen (best, voting, concatenate) is named, not printed twice."""

    REPEATS = ("best", "voting", "concatenate")

    def __init__(self, s: Session, verbose: bool):
        self.s, self.verbose = s, verbose
        self.single = False      # one expert selected: `?` streams its tokens live
        self.synthesis = ""
        self.aggregator = False

    def _line(self, text: str) -> None:
        self.s.end_line()
        self.s.write(text)

    def _shown(self) -> bool:
        """The final answer is text already streamed by an expert."""
        return self.synthesis in self.REPEATS and (self.verbose or self.single)

    def __call__(self, kind: str, data: dict) -> None:
        v = self.verbose
        if kind == "route":
            d = data["decision"]
            self.single = len(d["selected"]) == 1
            if v:
                self._line(f"[Router] {d['routing']}: {_scores(d['selected'])}"
                           + (" (fallback)" if d.get("fallback") else "") + "\n")
            else:
                self._line(f"[{_scores(d['selected'])}]\n")
        elif kind == "expert_start":
            if data.get("role") == "aggregator":
                self.aggregator = True
                self._line(f"[Synthesizer] summarize, written by {data['expert']}: " if v else
                           f"[summary by {data['expert']}]\n")
            elif v and self.synthesis != "weighted":  # weighted names its experts in its own line
                self._line(f"[Expert] {data['expert']} ({data['score']:.2f}): ")
            elif not v and not self.single and self.synthesis != "weighted":
                self._line(f"[asking {data['expert']} ...]\n")
        elif kind == "expert_error":  # a remote expert's board failed: the next expert answers
            self._line(f"[{data['expert']} failed: {data.get('error', '')}]\n")
        elif kind == "expert_token" and (v or self.single):
            self.s.write(data.get("text", ""))
        elif kind == "expert_done" and v:
            r = data.get("result") or {}
            self._line(f"         ({r.get('tokens', 0)} tokens, {r.get('tokens_per_s', 0):.1f} tok/s"
                       + (f", {r['knowledge']} knowledge pairs" if r.get("knowledge") else "")
                       + (", stopped" if r.get("finish_reason") == "cancelled" else "") + ")\n")
        elif kind == "synth_start":
            self.synthesis = data.get("synthesis", "")
            weights = data.get("weights")
            if v and self.synthesis == "weighted":
                self._line(f"[Synthesizer] weighted ({', '.join(f'{k} {w:.2f}' for k, w in weights.items())}): ")
            elif not v and self.synthesis not in self.REPEATS and self.single:
                self._line("")
        elif kind == "answer_token" and not self._shown():
            if not v and self.single and not self.aggregator and self.synthesis not in ("weighted",):
                self._line("")
            self.s.write(data.get("text", ""))

    def finish(self, result: dict) -> None:
        self.s.end_line()
        synthesis = result.get("synthesis")
        chosen = next((a for a in result.get("answers", []) if a["expert"] == result.get("chosen")), None)
        if self.verbose and synthesis in self.REPEATS:
            if synthesis == "concatenate":
                what = f"the {len(result.get('answers', []))} answers above, best score first"
            elif chosen is None:
                what = "no answer"
            elif synthesis == "best":
                what = f"picked {chosen['expert']} (confidence {chosen.get('confidence') or 0:.2f})"
            else:
                what = f"picked {chosen['expert']} (agreement {chosen.get('agreement') or 0:.2f})"
            self.s.write(f"[Synthesizer] {synthesis}: {what}\n")
        t = result.get("timings") or {}
        bits = [f"synthesis {synthesis}"]
        if result.get("chosen"):
            bits.append(f"chosen {result['chosen']}")
        if t.get("total_s") is not None:
            bits.append(f"{t['total_s']:.2f} s")
        if result.get("finish_reason") == "cancelled":
            bits.append("stopped")
        self.s.write("(" + ", ".join(bits) + ")\n")
        if result.get("note"):
            self.s.write(f"note: {result['note']}\n")


def cmd_ai(s: Session, words: list[str], rest: str) -> Result:
    sub = words[1] if len(words) > 1 else ""
    args = words[2:]
    c = s.client
    if sub == "list":
        d = c.list()
        rows = [[r["name"], r["type"], r["base"] or "-", r["quant"] or "-", _size(r["size"] or None),
                 _size(r["estimate"]), "yes" if r["loaded"] else "no", _where(r)] if not r.get("error") else
                [r["name"], r["type"], r["base"] or "-", "error", "", "", r["error"], _where(r)] for r in d["models"]]
        text = _table(rows, ["NAME", "TYPE", "BASE", "QUANT", "SIZE", "MEMORY", "LOADED", "WHERE"]) if rows else \
            "no models"
        text += f"\nboard {d['profile']}: {_size(d['used'])} loaded of {_size(d['budget'])} budget"
        text += "".join(f"\npeer {p['name']} ({p['url']}, {p['api'] or 'api unknown'}): "
                        + ("up" if p["up"] else f"down: {p['reason']}" if p["up"] is False else "not asked yet")
                        for p in d.get("peers", []))
        text += "".join(f"\nwarning: {e}" for e in d.get("errors", []))
        return Result("ai list", d, text)
    if sub in ("load", "unload"):
        if len(args) != 1:
            raise CommandError(f"usage: ai {sub} NAME (see ai list for names)")
        d = getattr(c, sub)(args[0])
        s.forget()
        if sub == "load":
            text = (f"loaded {args[0]} in {d['seconds']:.2f} s; model memory {_size(d['used'])} of "
                    f"{_size(d['budget'])}")
        else:
            text = f"unloaded {', '.join(d['unloaded'])}" if d["unloaded"] else f"{args[0]} was not loaded"
        return Result(f"ai {sub}", d, text)
    if sub == "info":
        if len(args) > 1:
            raise CommandError("usage: ai info [NAME]")
        d = c.info(args[0] if args else None)
        return Result("ai info", d, _render_info(d))
    if sub == "config":
        if len(args) == 2:
            name, (key, value) = None, args
        elif len(args) == 3:
            name, key, value = args
        else:
            raise CommandError("usage: ai config KEY VALUE "
                               "(system.toml: threads, keep_alive, max_memory, routing, ...) "
                               "or ai config NAME KEY VALUE (a model's temperature, max_tokens, context_size, ...)")
        d = c.config(key, value, name)
        where = f"{d['model']}: " if d.get("model") else ""
        return Result("ai config", d, f"{where}{d['key']} = {d['value']!r}  (saved to {d['saved_to']}; applies "
                                      f"{'at ' if d['applies'] != 'now' else ''}{d['applies']})")
    if sub == "stats":
        d = c.stats()
        rows = [[n, st["calls"], st["prompt_tokens"], st["tokens"], f"{st['tokens_per_s']:.1f}",
                 f"{st['last_tokens_per_s']:.1f}"] for n, st in d["experts"].items()]
        text = _table(rows, ["EXPERT", "CALLS", "PROMPT", "TOKENS", "TOK/S", "LAST TOK/S"]) if rows else \
            "no generations yet"
        m = d["memory"]
        text += (f"\nloaded: {', '.join(d['loaded']) or 'nothing'}; model memory {_size(m['used'])} of "
                 f"{_size(m['budget'])}; process RSS {_size(m['rss'])}")
        return Result("ai stats", d, text)
    if sub == "benchmark":
        if len(args) > 1:
            raise CommandError("usage: ai benchmark [NAME]")
        s.write(f"benchmarking {args[0] if args else 'the default model'} ...\n")
        d = c.benchmark(args[0] if args else None, cancel=s.cancel)
        text = (f"{d['name']}: prompt {d['prompt_tokens']} tokens at {d['prompt_tokens_per_s'] or 0:.1f} tok/s, "
                f"generation {d['tokens']} tokens at {d['tokens_per_s']:.1f} tok/s "
                f"(first token {d['ttft_s'] * 1000:.0f} ms, {d['threads']} threads, {d['profile']}"
                + (f", loaded in {d['load_s']:.2f} s" if d.get("load_s") else "") + ")")
        return Result("ai benchmark", d, text)
    hint = difflib.get_close_matches(sub, AI_SUBCOMMANDS, n=1)
    raise CommandError(f"unknown ai command {quote(sub)}; " + (f"did you mean 'ai {hint[0]}'?" if hint else
                                                          f"use one of: {', '.join(AI_SUBCOMMANDS)}"))


AI_SUBCOMMANDS = ["list", "load", "unload", "info", "config", "stats", "benchmark"]


def _threads(d: dict) -> str:
    """'2 (fixed)' or 'up to 2, the fastest measured (gemma3-270m: 1)'."""
    if d.get("threads_fixed", True):
        return f"{d['threads']} (fixed)"
    now = ", ".join(f"{base}: {n}" for base, n in d.get("threads_now", {}).items())
    return f"up to {d['threads']}, the fastest measured" + (f" ({now})" if now else "")


def _weights(w: dict | None) -> list[str]:
    """Which buffer types llama.cpp keeps the weights in on this host, and why."""
    if not w:
        return []
    return [f"weights      {' then '.join(w['buffer_types'])} buffers ({w['reason']})"]


def _compute(d: dict) -> list[str]:
    """The compute buffer llama.cpp reserved per loaded base (address space sized for the micro-batch)."""
    reserved = d.get("compute_reserved") or {}
    if not reserved:
        return []
    each = ", ".join(f"{name} {_size(n)}" for name, n in reserved.items())
    return [f"compute      {each} reserved for {d.get('ubatch')}-token micro-batches (touched as needed)"]


def _split(split: dict | None) -> list[str]:
    """A base split across RPC workers: each worker's share of the layers and memory, and what stays here."""
    if not split:
        return []
    each = ", ".join(f"{w['endpoint']} {w['share']:.0%} ({_size(w['bytes'])})" for w in split["workers"])
    return [f"split        {each}; here {_size(split['local']['total'])} (embeddings, logits, sampler)"]


def _render_info(d: dict) -> str:
    m = d["memory"]
    if "name" not in d:
        return "\n".join([
            f"profile      {d['profile']}  {d.get('profile_description', '')}".rstrip(),
            f"threads      {_threads(d)}",
            f"keep_alive   {d['keep_alive']:g} s",
            f"models       {d['models']} ({d['experts']} experts) in {d['models_dir']}",
            f"loaded       {', '.join(d['loaded']) or 'nothing'}",
            f"memory       {_size(m['used'])} of {_size(m['budget'])} budget; process RSS {_size(m['rss'])}",
            *_weights(d.get("weights")),
            *_compute(d),
            f"config       {d['config']}"])
    inf = d["inference"]
    est = d["estimate"]
    lines = [f"name         {d['name']} ({d['type']})" + (f"  {d['description']}" if d.get("description") else ""),
             f"file         {d['file']}"]
    if d.get("adapter"):
        lines.append(f"adapter      {d['adapter']} on {d['base']} (scale {d['scale']:g})")
    if d.get("domain"):
        lines.append(f"domain       {d['domain']}; keywords: {', '.join(d['keywords']) or '-'}")
    lines += [
        f"model        {d['arch']}, {d['parameters']:,} parameters, {d['quant']}",
        f"context      {d['context_size']} tokens (trained {d['trained_context']})",
        f"sampler      temperature {inf['temperature']:g}, top_p {inf['top_p']:g}, top_k {inf['top_k']}, "
        f"min_p {inf['min_p']:g}, repeat_penalty {inf['repeat_penalty']:g}, max_tokens {inf['max_tokens']}",
        f"memory       needs {_size(est['total'])} (weights {_size(est['weights'])}, KV {_size(est['kv_cache'])}, "
        f"compute {_size(est['compute'])}); loaded {_size(m['used'])} of {_size(m['budget'])} budget",
        *_split(d.get("split")),
        f"loaded       {'yes' if d['loaded'] else 'no'}",
        "last speed   " + (f"{d['last_tokens_per_s']:.1f} tok/s" if d.get("last_tokens_per_s") else "not run yet")]
    return "\n".join(lines)


SETTINGS_KEYS = ("routing", "synthesis")


def _set_format(s: Session, value: str) -> None:
    """settings format=json | format=FILE (a JSON schema) | format=text: what `?` answers keep to (this session)."""
    from hublab.runtime.engine.structured import from_format

    if value == "text":
        s.format, s.format_name = None, "text"
        return
    if value == "json":
        fmt = "json"
    else:
        try:
            fmt = json.loads(Path(value).expanduser().read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"format={value}: not json, text or a readable JSON schema file "
                               f"({exc.__class__.__name__})") from None
        except ValueError as exc:
            raise CommandError(f"format={value}: the file is not JSON ({exc})") from None
    try:
        from_format(fmt, value)
    except HublabError as exc:
        raise CommandError(str(exc)) from None
    s.format, s.format_name = fmt, value


def cmd_settings(s: Session, words: list[str], rest: str) -> Result:
    args = words[1:]
    if args and args[0].startswith("format="):
        _set_format(s, args[0].partition("=")[2])
        return Result("settings", {"format": s.format_name}, f"format     {s.format_name} (this session's ? answers)")
    if args and args[0] != "moe":
        raise CommandError(f"unknown settings group {quote(args[0])}; use: settings moe [routing=topk:2] "
                           "[synthesis=voting], or settings format=json|text|SCHEMA.json")
    values: dict[str, str] = {}
    for a in args[1:]:
        key, eq, value = a.partition("=")
        if not eq or not value:
            raise CommandError(f"{quote(a)}: write KEY=VALUE, e.g. routing=topk:2 or synthesis=voting")
        if key not in SETTINGS_KEYS:
            hint = difflib.get_close_matches(key, SETTINGS_KEYS, n=1)
            raise CommandError(f"unknown moe setting {quote(key)}; " + (f"did you mean {hint[0]!r}?" if hint else
                                                                   "use routing=... or synthesis=..."))
        values[key] = value
    d = s.client.settings(**values)
    text = (f"routing    {d['routing']}\nsynthesis  {d['synthesis']}\nfallback   {d['fallback']}\n"
            f"router     {d['router']} (keyword weight {d['keyword_weight']:g})\nformat     {s.format_name}")
    if values:
        text = f"saved to {d.get('config')}\n" + text
    return Result("settings", d, text)


def cmd_pkg(s: Session, words: list[str], rest: str) -> Result:
    from hublab.runtime.pkg import cli as pkg_cli

    if not s.local:
        raise CommandError("pkg works on the device itself, not over --remote; run `hublab pkg ...` there")
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse would exit the shell
            raise CommandError(f"pkg: {message if len(message) <= 300 else message[:300] + '...'}; see help pkg")

        def exit(self, status=0, message=None):
            raise _HelpShown(self.format_help() if status == 0 else (message or ""))

    parser = Parser(prog="pkg", add_help=True)
    pkg_cli.add_arguments(parser)
    if len(words) < 2:
        raise CommandError("usage: pkg install|remove|list|search|show|update|verify|build|publish|keygen ... "
                           "(help pkg)")
    try:
        args = parser.parse_args(words[1:])
    except _HelpShown as shown:
        return Result("pkg", {"help": str(shown)}, str(shown).rstrip())
    out = pkg_cli.call(args, progress=None if s.json else pkg_cli.ProgressBar())
    if args.pkg_command in ("install", "remove", "update"):
        s.client.rescan()
        s.forget()
    if not out.ok:
        s.write(out.text + "\n")  # what went wrong, above the error line
        raise CommandError(f"pkg {args.pkg_command} reported problems (exit status 1)")
    return Result(f"pkg {args.pkg_command}", out.data, out.text)


class _HelpShown(Exception):
    pass


def cmd_help(s: Session, words: list[str], rest: str) -> Result:
    if len(words) > 1:
        name = words[1].lstrip("?") or "?"
        if name not in COMMANDS:
            raise CommandError(f"no command {quote(name)}; " + _suggest(name))
        usage, summary, details = HELP[name]
        return Result("help", {"command": name, "usage": usage, "summary": summary, "details": details},
                      f"{usage}\n  {summary}" + (f"\n\n{details}" if details else ""))
    rows = [[HELP[n][0], HELP[n][1]] for n in COMMANDS]
    text = _table(rows, ["COMMAND", "WHAT IT DOES"])
    text += "\n\nTab completes commands, expert and package names. Ctrl-C stops an answer, Ctrl-D leaves."
    return Result("help", {"commands": [{"command": n, "usage": HELP[n][0], "summary": HELP[n][1]} for n in COMMANDS]},
                  text)


def read_history(path: Path | None) -> list[str]:
    """Commands typed in interactive sessions, oldest first (prompt_toolkit's FileHistory format)."""
    if path is None or not path.is_file():
        return []
    entries, current = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("+"):
            current.append(line[1:])
        elif current:
            entries.append("\n".join(current))
            current = []
    if current:
        entries.append("\n".join(current))
    return entries


def cmd_history(s: Session, words: list[str], rest: str) -> Result:
    entries = read_history(s.history_path)
    n = len(entries)
    if len(words) > 1:
        if not words[1].isdigit():
            raise CommandError("usage: history [N] (the last N commands)")
        entries = entries[-int(words[1]):]
    first = n - len(entries) + 1
    text = "\n".join(f"{i:>5}  {e}" for i, e in enumerate(entries, first)) or "no history yet"
    return Result("history", {"file": str(s.history_path) if s.history_path else None, "entries": entries}, text)


def cmd_clear(s: Session, words: list[str], rest: str) -> Result:
    if s.interactive and not s.json:
        from prompt_toolkit.shortcuts import clear

        clear()
    return Result("clear", {"cleared": s.interactive})


def cmd_version(s: Session, words: list[str], rest: str) -> Result:
    d = s.client.version()
    text = f"hublab {d['hublab']}"
    if d.get("llama_cpp_python"):
        text += f", llama-cpp-python {d['llama_cpp_python']}, Python {d['python']}"
    text += f"; profile {d['profile']} ({d['where']})"
    return Result("version", d, text)


def cmd_exit(s: Session, words: list[str], rest: str) -> Result:
    return Result("exit", {"exit": True})


Handler = Callable[[Session, list, str], Result]
COMMANDS: dict[str, Handler] = {
    "?": cmd_ask, "ai": cmd_ai, "moe": cmd_moe, "settings": cmd_settings, "pkg": cmd_pkg, "help": cmd_help,
    "history": cmd_history, "clear": cmd_clear, "version": cmd_version, "exit": cmd_exit,
}
ALIASES = {"quit": "exit", "ask": "?"}

HELP: dict[str, tuple[str, str, str]] = {
    "?": ("?<question>", "ask through the configured routing and synthesis; shows which experts answered",
          "e.g. ?how do I reverse a list in python\nCtrl-C stops the answer and keeps the shell."),
    "ai": ("ai list|load|unload|info|config|stats|benchmark", "models and experts: what is on disk and loaded",
           "ai list                  models and experts on disk: size, quantization, memory, loaded or not\n"
           "ai load NAME             load a model or expert (fit-checked against the board's memory budget)\n"
           "ai unload NAME           unload it (a base takes its adapter experts with it)\n"
           "ai info [NAME]           parameters, quantization, context, memory used / budget, last tokens/s\n"
           "ai config KEY VALUE      set and save a system.toml setting (threads, keep_alive, max_memory, ...)\n"
           "ai config NAME KEY VALUE set and save a model's sampler setting (temperature, max_tokens, "
           "context_size, top_p, top_k, ...)\n"
           "ai stats                 per-expert calls, tokens, tokens/s, and memory\n"
           "ai benchmark [NAME]      prompt and generation tokens/s on a fixed prompt"),
    "moe": ("moe route|query \"<question>\"", "show routing scores, or answer with [Router] [Expert] "
            "[Synthesizer] progress",
            "moe route \"q\"   every expert's score and which ones the strategy selects (nothing generated)\n"
            "moe query \"q\"   route, run the experts, synthesise, printing each step"),
    "settings": ("settings moe [routing=R] [synthesis=S] | settings format=json|text|SCHEMA.json",
                 "show or set (and save) the routing strategy and synthesis; the format ? answers keep to",
                 "routing: topk:K, threshold:T, single, all\n"
                 "synthesis: best, weighted, voting, concatenate, summarize"),
    "pkg": ("pkg install|remove|list|search|show|update|verify ...", "model packages (help pkg for details)",
            "pkg list | pkg search [TERM] | pkg show NAME[:TAG] | pkg install NAME[:TAG] | pkg remove NAME\n"
            "pkg update [NAME] | pkg verify [NAME] | pkg build DIR | pkg publish DIR | pkg keygen\n"
            "(pkg COMMAND --help lists each one's options)"),
    "help": ("help [command]", "this list, or one command in detail", ""),
    "history": ("history [N]", "commands typed in earlier sessions (saved across runs)", ""),
    "clear": ("clear", "clear the screen", ""),
    "version": ("version", "hublab, llama.cpp and profile versions", ""),
    "exit": ("exit", "leave the shell (or Ctrl-D)", ""),
}


def _suggest(word: str) -> str:
    close = difflib.get_close_matches(word, list(COMMANDS) + list(ALIASES), n=1) if len(word) < 64 else []
    return (f"did you mean {close[0]!r}? " if close else "") + "type help for the list"


def parse(line: str) -> tuple[str, list[str], str]:
    """(command, words, rest after the command) for one line."""
    text = line.strip()
    if text.startswith("?"):
        return "?", ["?"], text[1:]
    head, _, rest = text.partition(" ")
    head = ALIASES.get(head, head)
    if head in ("?", "moe"):  # free text: a question may hold any quote or apostrophe
        return head, [head] + rest.split(), rest
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise CommandError(f"cannot read that line ({exc}); close the quote") from None
    words[0] = ALIASES.get(words[0], words[0])
    return words[0], words, rest


MAX_LINE = 64 * 1024  # a question longer than this would not fit any expert's context anyway


def execute(s: Session, line: str) -> Result:
    """Run one command line; raises HublabError (one line, with a hint) when it cannot."""
    if has_surrogates(line):  # bytes that were not UTF-8, from a pipe (stdin is read with surrogateescape)
        raise CommandError("that line is not valid UTF-8 text; type or pipe UTF-8")
    if len(line) > MAX_LINE:
        raise CommandError(f"that line is {len(line)} characters, over the {MAX_LINE} a command may have")
    name, words, rest = parse(line)
    handler = COMMANDS.get(name)
    if handler is None:
        raise CommandError(f"unknown command {quote(name)}; {_suggest(name)}")
    s.cancel.clear()
    try:
        return handler(s, words, rest)
    except HublabError as exc:  # a last guard: no error prints more than a screen of what it was given
        if len(str(exc)) > 1000 and len(exc.args) == 1:
            exc.args = (clip_message(str(exc)),)
        raise


def envelope(command: str, result: Result | None = None, error: str | None = None) -> str:
    """The one JSON document a command prints in --json mode."""
    if error is not None:
        doc = {"ok": False, "command": command, "error": error}
    else:
        doc = {"ok": True, "command": result.command, "result": result.data}
    return json.dumps(doc, default=str)


def command_name(line: str) -> str:
    try:
        name, words, _ = parse(line)
    except HublabError:
        name, words = line.strip().split(" ", 1)[0], []
    if name in ("ai", "moe", "pkg") and len(words) > 1:
        name = f"{name} {words[1]}"
    # what the --json envelope says the command was: a few characters of a 100 KB line, valid UTF-8
    name = name if len(name) <= 40 else name[:40] + "..."
    return name.encode("utf-8", "replace").decode("utf-8")
