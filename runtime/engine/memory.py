"""What a GGUF will cost in memory, read from its header before anything is loaded.

weights  = the bytes of every tensor (llama.cpp mmaps them; inference touches them all)
kv cache = context x layers x kv-heads x (key dim + value dim) x 2 bytes (f16); sliding-window layers
           only keep their window
compute  = repacked weights, logits buffers over the vocabulary and graph activations (see compute_bytes)
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import HublabError

# llama.cpp's file types (llama_ftype) by number, as GGUF general.file_type stores them.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
              17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
              23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
              30: "IQ4_XS", 31: "IQ1_M", 32: "BF16"}

# ggml tensor types by number: name, elements per block, bytes per block (the GGUF format's layouts; kept
# here so that reading a header does not import the gguf package, ~5 MB resident on a Pi).
TENSOR_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

N_UBATCH = 512


class GGUFError(HublabError, ValueError):
    """A file is not a GGUF we can read."""
  # llama.cpp's default micro-batch, which sizes the compute buffer


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    kind: str                 # "model" or "adapter"
    arch: str
    name: str
    file_type: str
    tensor_bytes: int
    n_params: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_vocab: int
    context_length: int
    sliding_window: int
    chat_template: str
    lora_alpha: float
    embd_bytes: int = 0       # the token embedding table (token_embd.weight): it stays on the host in a split
    output_bytes: int = 0     # the output matrix (output.weight); 0 = tied to the embeddings

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("chat_template")
        return d


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _parse_header(path: str) -> tuple[dict, list[tuple[str, int, int]]]:
    """GGUF metadata and tensor infos (name, ggml type, element count), read straight from the header.

    gguf-py's GGUFReader decodes every array element (262k token strings for gemma: 20 s on a slow core);
    here arrays are skipped and stored as their length, which is all the runtime needs of them."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError("bad magic (not a GGUF file)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", m, pos)
            pos += 8 + n
            return bytes(m[pos - n:pos]).decode("utf-8", errors="replace")

        def value(vtype: int):
            nonlocal pos
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                etype, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if etype == _STRING:
                    for _ in range(count):
                        (n,) = struct.unpack_from("<Q", m, pos)
                        pos += 8 + n
                elif etype in _SCALARS:
                    if count and etype in (4, 5) and count <= 4096:  # per-layer head counts
                        items = struct.unpack_from(f"<{count}{_SCALARS[etype][1]}", m, pos)
                        pos += 4 * count
                        return list(items)
                    pos += struct.calcsize(_SCALARS[etype]) * count
                else:
                    raise ValueError(f"array of unknown type {etype}")
                return count
            if vtype not in _SCALARS:
                raise ValueError(f"unknown value type {vtype}")
            (v,) = struct.unpack_from(_SCALARS[vtype], m, pos)
            pos += struct.calcsize(_SCALARS[vtype])
            return v

        meta = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", m, pos)
            pos += 4
            meta[key] = value(vtype)
        tensors = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", m, pos)
            if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
                raise ValueError(f"tensor {name[:60]!r} has {n_dims} dimensions (a GGUF tensor has 1 to 4)")
            dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
            ttype, _offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            tensors.append((name, ttype, math.prod(dims)))  # exact: an absurd shape must not wrap around
    return meta, tensors


@lru_cache(maxsize=64)
def _read(path: str, mtime: float) -> GGUFInfo:
    try:
        meta, tensors = _parse_header(path)
    except (ValueError, OSError, struct.error) as exc:
        raise GGUFError(f"{path}: not a readable GGUF file ({exc}); re-download or re-export it") from None
    arch = str(meta.get("general.architecture", ""))

    def arch_field(name, default=0):
        v = meta.get(f"{arch}.{name}", default)
        return max(v) if isinstance(v, list) and v else v

    sizes: dict[str, int] = {}
    tensor_bytes = n_params = embd_bytes = output_bytes = 0
    for name, ttype, n in tensors:
        if ttype not in TENSOR_TYPES:
            raise GGUFError(f"{path}: tensor type {ttype} unknown to this hublab; update hublab")
        type_name, block, type_size = TENSOR_TYPES[ttype]
        nbytes = n // block * type_size
        tensor_bytes += nbytes
        if name == "token_embd.weight":
            embd_bytes = nbytes
        elif name == "output.weight":
            output_bytes = nbytes
        n_params += n
        sizes[type_name] = sizes.get(type_name, 0) + nbytes
    _check_header(path, meta, arch, tensor_bytes)
    ftype = meta.get("general.file_type")
    if ftype is None:
        # adapters carry no file type: name the tensor type holding most of the bytes
        file_type = max(sizes, key=sizes.get) if sizes else "unknown"
    else:
        file_type = FILE_TYPES.get(ftype, "unknown")
    n_head = int(arch_field("attention.head_count", 0) or 0)
    n_head_kv = int(arch_field("attention.head_count_kv", n_head) or 0)
    n_embd = int(arch_field("embedding_length", 0) or 0)
    head_dim = n_embd // n_head if n_head else 0
    return GGUFInfo(
        path=path, kind=str(meta.get("general.type", "model")), arch=arch,
        name=str(meta.get("general.name", Path(path).stem)), file_type=file_type,
        tensor_bytes=tensor_bytes, n_params=n_params, n_layer=int(arch_field("block_count", 0) or 0),
        n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        key_length=int(arch_field("attention.key_length", head_dim) or head_dim),
        value_length=int(arch_field("attention.value_length", head_dim) or head_dim),
        n_vocab=int(meta.get("tokenizer.ggml.tokens", 0) or arch_field("vocab_size", 0) or 0),
        context_length=int(arch_field("context_length", 0) or 0),
        sliding_window=int(arch_field("attention.sliding_window", 0) or 0),
        chat_template=str(meta.get("tokenizer.chat_template", "") or ""),
        lora_alpha=float(meta.get("adapter.lora.alpha", 0.0) or 0.0), embd_bytes=embd_bytes,
        output_bytes=output_bytes,
    )


# What a real model's header can say; beyond these a header is corrupt, not a model too big for the board.
_HEADER_LIMITS = {"block_count": 4096, "embedding_length": 1 << 20, "attention.head_count": 1 << 14,
                  "attention.head_count_kv": 1 << 14, "attention.key_length": 1 << 16,
                  "attention.value_length": 1 << 16, "context_length": 1 << 24, "vocab_size": 1 << 24,
                  "attention.sliding_window": 1 << 24}


def _check_header(path: str, meta: dict, arch: str, tensor_bytes: int) -> None:
    """Refuse a header whose numbers no real GGUF has, naming the file and the field."""
    size = os.path.getsize(path)
    if tensor_bytes > size:
        raise GGUFError(f"{path}: the header describes {tensor_bytes} bytes of tensors but the file has {size}; "
                        "it is truncated or corrupt: re-download or re-export it")
    for name, most in _HEADER_LIMITS.items():
        value = meta.get(f"{arch}.{name}")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= most:
                raise GGUFError(f"{path}: header field {arch}.{name} = {str(v)[:40]} is not a real model's "
                                f"(at most {most}); the file is corrupt: re-download or re-export it")


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim): loading a model or an adapter
    frees tens of MB of scratch that would otherwise stay resident. Nothing happens without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drop_file_cache(*paths: Path | str) -> None:
    """Tell the kernel the page cache of files already read into memory (the router's ONNX graph, knowledge
    packs) may go: on a 512 MB board their cached pages otherwise sit beside the copy that is used, and count
    against a memory cgroup. Nothing happens where posix_fadvise is missing or a file is gone."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)


def context_for(system_inference: dict, cfg, owner, default_context: int, info: GGUFInfo) -> int:
    """The context a model runs with: system.toml's [inference] context_size, else the expert's own, else its
    base's (`owner`), else the board profile's default, within what the GGUF was trained for."""
    n_ctx = (system_inference.get("context_size") or cfg.inference.context_size or owner.inference.context_size
             or default_context)
    return min(n_ctx, info.context_length) if info.context_length else n_ctx


def read_gguf(path: Path | str) -> GGUFInfo:
    """Header facts of a GGUF (model or LoRA adapter); cached by path and mtime."""
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: GGUF file not found; fix the path")
    return _read(str(p.resolve()), p.stat().st_mtime)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def kv_cache_bytes(info: GGUFInfo, n_ctx: int) -> int:
    per_token_layer = info.n_head_kv * (info.key_length + info.value_length) * 2  # f16 K and V
    if info.sliding_window and info.arch.startswith("gemma3"):
        # gemma3 interleaves 5 sliding-window layers with 1 global layer; llama.cpp keeps only
        # window + a micro-batch of cells for the sliding ones.
        n_global = max(1, info.n_layer // 6)
        swa_cells = min(n_ctx, info.sliding_window + N_UBATCH)
        return per_token_layer * (n_global * n_ctx + (info.n_layer - n_global) * swa_cells)
    return per_token_layer * info.n_layer * n_ctx


def compute_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """What llama.cpp keeps resident besides weights and KV: repacked copies of some quantized weights
    (CPU_REPACK), the logits row and its work buffers over the vocabulary, and graph activations for a
    micro-batch. llama.cpp reserves far more address space for its graph (micro-batch x vocabulary) than
    a generation touches; RSS is what boards run out of, so the constants below were fitted to measured
    RSS growth of the gemma base at every profile's context (bench/runtime.py "fit")."""
    n_tok = min(N_UBATCH, n_ctx)
    return (8 << 20) + int(info.tensor_bytes * 0.05) + info.n_vocab * 4 * 32 + n_tok * info.n_embd * 4 * 12


def estimate_model(info: GGUFInfo, n_ctx: int) -> MemoryEstimate:
    """Memory a model costs once loaded with context n_ctx and used for one generation."""
    return MemoryEstimate(weights=info.tensor_bytes, kv_cache=kv_cache_bytes(info, n_ctx),
                          compute=compute_bytes(info, n_ctx))


def estimate_adapter(info: GGUFInfo) -> MemoryEstimate:
    """A LoRA adapter's tensors are copied into memory next to its base."""
    return MemoryEstimate(weights=info.tensor_bytes, kv_cache=0, compute=0)
