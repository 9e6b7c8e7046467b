"""One base across several boards with llama.cpp's RPC backend (ggml-rpc): what hublab adds around the engine.

Workers run ggml's own RPC server (`hublab rpc-worker`); a base TOML names them (`[model] rpc = ["pi2:50052"]`,
optional `tensor_split`). llama.cpp then keeps every layer, its KV cache included, on the workers (in the order
and the shares given) and only the token embedding table, the logits and the sampler on this board.

Here: the HELLO handshake that checks a worker before anything is loaded (ggml-rpc has no authentication and
aborts its client's process on a bad answer, so a worker is asked by us first), the RPC devices handed to
llama.cpp through ggml's C API (llama-cpp-python dropped `rpc_servers`), and the memory a split costs each
board. The process that holds a split base lives in split.py.
"""
from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

from ..config import parse_endpoint
from ..errors import HublabError
from ..inputs import is_loopback
from .memory import GGUFInfo, MemoryEstimate, compute_bytes, context_for, kv_cache_bytes, read_gguf

HELLO = 14           # RPC_CMD_HELLO, fixed across protocol versions
CONN_CAPS = 24       # RPC_CONN_CAPS_SIZE: the HELLO request's payload, and the tail of its reply
# What a process that holds a split base costs on this board beyond llama.cpp's buffers: a Python with numpy and
# llama-cpp-python imported (measured RSS of the idle child here: bench/rpc.py "child_rss").
CHILD_OVERHEAD = 60 << 20
UNSAFE = ("ggml-rpc has no authentication: anyone who reaches this port can run code on this board's memory; "
          "bind it to a private link only (never an open network)")


class RpcError(HublabError):
    """A worker cannot be used: it does not answer, speaks another protocol version, or went away."""


class ProtocolMismatch(RpcError):
    """The worker's ggml-rpc protocol version is not this llama.cpp's."""


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        data += chunk
    return data


def hello(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """The ggml-rpc protocol version `endpoint` (host:port) answers HELLO with; RpcError when it does not."""
    where = parse_endpoint(endpoint)
    if where is None:
        raise RpcError(f"{endpoint!r} is not host:port")
    try:
        with socket.create_connection(where, timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(bytes([HELLO]) + struct.pack("<Q", CONN_CAPS) + bytes(CONN_CAPS))
            (size,) = struct.unpack("<Q", _recv(sock, 8))
            if not 3 <= size <= 4096:
                raise ConnectionError(f"a HELLO reply of {size} bytes")
            reply = _recv(sock, size)
    except TimeoutError:
        raise RpcError(f"RPC worker {endpoint} did not answer HELLO within {timeout:g} s (busy serving another "
                       "client, or not a ggml-rpc server); check `hublab rpc-worker` runs there") from None
    except (ConnectionError, OSError) as exc:
        raise RpcError(f"RPC worker {endpoint} is not reachable ({exc.__class__.__name__}: {exc}); start "
                       f"`hublab rpc-worker` there and check the address") from None
    return reply[0], reply[1], reply[2]


def check_worker(endpoint: str, ours: tuple[int, int, int], timeout: float = 5.0) -> tuple[int, int, int]:
    """HELLO `endpoint` and refuse it unless it speaks exactly protocol `ours` (major.minor.patch: the patch
    number follows ggml's operation list, so two builds that differ there read graphs differently)."""
    theirs = hello(endpoint, timeout)
    if theirs != ours:
        raise ProtocolMismatch(f"RPC worker {endpoint} speaks ggml-rpc {'.'.join(map(str, theirs))}, this hublab's "
                               f"llama.cpp speaks {'.'.join(map(str, ours))}; run the same hublab version (the same "
                               "llama-cpp-python) on the worker")
    return theirs


# -- binding a worker ----------------------------------------------------------------------------------------

def check_host(host: str, allow_remote: bool) -> None:
    """Refuse an address beyond loopback unless `allow_remote` (ggml-rpc has no authentication)."""
    if not host or any(c.isspace() for c in host) or len(host) > 253:
        raise HublabError(f"--host {host[:60]!r} is not an address; give an IP address such as 10.0.0.2")
    if not is_loopback(host) and not allow_remote:
        raise HublabError(f"--host {host} is beyond loopback and {UNSAFE}; add --allow-remote to bind it anyway")


# -- devices ---------------------------------------------------------------------------------------------------

_rpc_lib = None


def rpc_devices(endpoints: list[str] | tuple[str, ...]) -> list[int]:
    """ggml backend devices (pointers) for the workers, in order: libggml-rpc, built from the same llama.cpp as
    llama-cpp-python (engine/llamacpp.py), loaded into this process beside it. Connects to each worker; a worker
    that fails here aborts the process (ggml-rpc does), which is why only a split base's own process calls it."""
    global _rpc_lib
    import llama_cpp  # noqa: F401  (its libggml-base must be the one libggml-rpc binds to)

    from .llamacpp import require

    if _rpc_lib is None:
        lib = ctypes.CDLL(str(require("rpc-client")), mode=ctypes.RTLD_GLOBAL)
        lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
        lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _rpc_lib = lib
    devices = []
    for endpoint in endpoints:
        reg = _rpc_lib.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise RpcError(f"llama.cpp could not add RPC worker {endpoint}")
        devices += [_rpc_lib.ggml_backend_reg_dev_get(reg, i) for i in range(_rpc_lib.ggml_backend_reg_dev_count(reg))]
    return devices


# -- memory ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """Where a split base's memory goes: this board (`local`) and each worker (`workers`: endpoint -> bytes)."""
    local: MemoryEstimate
    workers: dict[str, int]
    shares: dict[str, float]

    def to_dict(self) -> dict:
        return {"local": self.local.to_dict(), "workers": [
            {"endpoint": e, "share": round(self.shares[e], 4), "bytes": b} for e, b in self.workers.items()]}


def shares(endpoints: tuple[str, ...], weights: tuple[float, ...]) -> dict[str, float]:
    """Each worker's fraction of the layers (tensor_split normalised; even when not given)."""
    w = list(weights) if weights else [1.0] * len(endpoints)
    total = sum(w) or 1.0
    return {e: x / total for e, x in zip(endpoints, w)}


def split_estimate(info: GGUFInfo, n_ctx: int, endpoints: tuple[str, ...], weights: tuple[float, ...]) -> Split:
    """This board keeps the token embeddings, the logits and sampler buffers, and the process holding them; the
    layers and their KV cache go to the workers by share (the output matrix with the last layers: a tied one is a
    second copy of the embeddings there)."""
    part = shares(endpoints, weights)
    embd, output = info.embd_bytes, info.output_bytes
    layers = max(0, info.tensor_bytes - embd - output)
    kv = kv_cache_bytes(info, n_ctx)
    logits = info.n_vocab * 4 * 32
    worker_compute = max(0, compute_bytes(info, n_ctx) - logits)  # activations of a micro-batch
    local = MemoryEstimate(weights=embd, kv_cache=0, compute=(8 << 20) + logits + CHILD_OVERHEAD)
    workers = {e: int((layers + kv) * f) + worker_compute for e, f in part.items()}
    if endpoints:
        workers[endpoints[-1]] += output or embd  # a tied output matrix is a second copy of the embeddings there
    return Split(local=local, workers=workers, shares=part)


def split_bases(system, profile) -> list[dict]:
    """Every base in the models dirs that names RPC workers, with its split at the context it would run with
    (what `hublab profile` shows: the local share is what counts against this board's budget)."""
    from ..config import scan_models

    out = []
    for name, cfg in sorted(scan_models(system.model_dirs).models.items()):
        if not cfg.rpc or cfg.path is None or not cfg.path.is_file():
            continue
        try:
            info = read_gguf(cfg.path)
        except HublabError:
            continue
        n_ctx = context_for(system.inference, cfg, cfg, profile.default_context, info)
        out.append({"name": name, "context_size": n_ctx, **split_estimate(info, n_ctx, cfg.rpc,
                                                                          cfg.tensor_split).to_dict()})
    return out
