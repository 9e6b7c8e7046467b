"""`hublab rpc-worker`: lend this board's memory and cores to a base split across boards (llama.cpp's RPC).

Runs ggml's own RPC server, built from the llama.cpp that hublab's llama-cpp-python vendors (engine/llamacpp.py),
so both ends speak the same protocol version. A base TOML on the main board names the workers:

    [model]
    rpc = ["pi2:50052", "pi3:50052"]

ggml-rpc has no authentication: whoever reaches the port can read and write this board's model memory and run
graphs on it. So the worker binds loopback unless told otherwise, and another address needs --allow-remote
(use a private link: a dedicated switch or a VPN, never an open network).

    hublab rpc-worker [--host 127.0.0.1] [--port 50052] [--threads N] [--cache] [--allow-remote] [--build]
"""
from __future__ import annotations

import os
import socket
import sys

from ..engine.llamacpp import build_tools, require
from ..engine.rpc import UNSAFE, check_host
from ..errors import HublabError
from ..inputs import is_loopback

DEFAULT_PORT = 50052


def command(binary, host: str, port: int, threads: int | None, cache: bool) -> list[str]:
    cmd = [str(binary), "-H", host, "-p", str(port)]
    if threads:
        cmd += ["-t", str(threads)]
    if cache:
        cmd.append("-c")  # tensors cached on disk by hash: a restarted main board loads them from here
    return cmd


def add_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; another needs "
                                                            "--allow-remote: RPC has no authentication)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the layers held here "
                                                              "(default: llama.cpp's choice)")
    parser.add_argument("--cache", action="store_true", help="cache received tensors on disk (faster reloads)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="bind an address beyond loopback (a private link only: RPC has no authentication)")
    parser.add_argument("--build", action="store_true", help="build the RPC server if needed, then exit")


def check_port(host: str, port: int) -> None:
    """Refuse a port already taken here (ggml's server would only say so on its own stderr and exit 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ggml's server sets it
        try:
            s.bind((host, port))
        except OSError as exc:
            raise HublabError(f"cannot bind {host}:{port} ({exc.strerror or exc}); pick another --port or --host, "
                              "or stop what holds it") from None


def cli(args) -> int:
    if not 1 <= args.port <= 65535:
        raise HublabError(f"--port {args.port} is not a TCP port; give 1 to 65535")
    if not 0 <= args.threads <= 1024:
        raise HublabError(f"--threads {args.threads} is out of range; give 1 to 1024, or 0 for llama.cpp's choice")
    try:
        check_host(args.host, args.allow_remote)
    except HublabError as exc:
        print(f"hublab rpc-worker: error: {exc}", file=sys.stderr)
        return 2
    if args.build:
        paths = build_tools(["rpc-server", "rpc-client"])
        print(f"built: {paths['rpc-server']}")
        return 0
    binary = require("rpc-server")
    check_port(args.host, args.port)
    if not is_loopback(args.host):
        print(f"hublab rpc-worker: warning: {args.host}:{args.port}: {UNSAFE}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # The worker is ggml's server itself from here: signals from systemd or a shell reach it directly.
    os.execv(str(binary), command(binary, args.host, args.port, args.threads or None, args.cache))
