"""What every input layer shares: finite numbers in range, and what a message may quote of a value.

Config keys (runtime/config.py), API fields (runtime/serve/http_common.py) and command-line arguments
(hublab/cli.py and the verbs' argparse types below) each check their own input, but with these rules,
so nan, inf or a 10 MB value is refused the same way everywhere and no error quotes more than
QUOTE_MAX characters of what it was given.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
from typing import Any

QUOTE_MAX = 80


def quote(value: Any, limit: int = QUOTE_MAX) -> str:
    """repr(value) for a message: at most `limit` characters, saying how long the whole was."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length()} bits>"  # repr of a huge int is slow or refused
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def clip_message(message: str, limit: int = 1000) -> str:
    """A last guard for an error that quoted more than it should have: its head and its length."""
    return message if len(message) <= limit else message[: limit // 2] + f"... ({len(message)} characters)"


def finite(value: Any) -> bool:
    """A real number (int or float, never bool) that is neither nan nor infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {_num(lo)} and {_num(hi)}"
    if lo is not None:
        return f"at least {_num(lo)}"
    return f"at most {_num(hi)}" if hi is not None else "a finite number"


def number_problem(value: Any, integer: bool = False, lo: float | None = None, hi: float | None = None) -> str | None:
    """Why `value` is not a usable number (integer, within [lo, hi]), or None when it is."""
    want = "an integer" if integer else "a number"
    if not finite(value):
        if isinstance(value, float):
            return f"{value!r} is not a finite number; use {want} {bounds(lo, hi)}"
        return f"expected {want}, got {quote(value)}"
    if integer and isinstance(value, float):
        if not value.is_integer():
            return f"expected an integer, got {quote(value)}"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return f"{quote(value)} is out of range; use {want} {bounds(lo, hi)}"
    return None


def has_surrogates(text: str) -> bool:
    """Text decoded with surrogateescape from bytes that were not UTF-8 (argv, a piped stdin)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- argparse types: a bad value is argparse's one-line usage error, never a traceback ------------------

def _arg_number(cast, kind: str, lo, hi):
    integer = cast is int

    def parse(text: str):
        try:
            value = cast(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} {bounds(lo, hi)}, got {quote(text)}") from None
        problem = number_problem(value, integer, lo, hi)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "integer" if integer else "number"
    return parse


def arg_int(lo: int | None = None, hi: int | None = None):
    return _arg_number(int, "an integer", lo, hi)


def arg_float(lo: float | None = None, hi: float | None = None):
    return _arg_number(float, "a number", lo, hi)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server on this machine: "localhost" or a loopback address. Any other name
    counts as reachable from outside (it may resolve elsewhere by the time the socket binds), so the agent and the
    WebUI need a token there and an RPC worker an explicit flag."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
