"""Where llama.cpp keeps a model's weights on this CPU: repacked buffers where they are safe, plain ones elsewhere.

llama.cpp moves quantized weights into "extra" buffer types when it loads a model: CPU_REPACK (interleaved
Q4_0/Q4_K rows for the wide NEON/AVX kernels, the fast path on a Pi's ARM cores) and, in a build made on an
x86 CPU with Intel AMX, an AMX buffer that comes first. That AMX buffer segfaults in the first decode of a
Q4_K model (llama.cpp issue #20824, open), so on such a host the extra buffer types are turned off
(`use_extra_bufts = False`, llama-server's `--no-repack`): the same greedy text, no crash.

The decision reads /proc/cpuinfo text and, where the llama.cpp library is loaded, the extra buffer types it
offers, so it can be tested with recorded samples of other hosts. `HUBLAB_REPACK=on|off` overrides it.
Every llama.cpp model load in the process follows it once `configure_llama()` ran (`load_llama` does).

A board profile can narrow it (`for_profile`): a Pi whose cores lack dotprod (Zero 2W, Pi 3, Pi 4) has no
repacked Q4 kernels in llama.cpp, so on the board its weights stay in the model file's pages; a host
simulating that board keeps them there too instead of holding a second, repacked copy in memory.
"""
from __future__ import annotations

import contextvars
import ctypes
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import HublabError

ENV = "HUBLAB_REPACK"
AMX_FLAGS = frozenset({"amx_int8", "amx_tile"})
ISSUE = "llama.cpp issue #20824"


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says of the first processor: architecture, model and feature flags."""

    arch: str              # x86_64 | aarch64 | armv7l | unknown
    model: str
    flags: frozenset[str]

    @property
    def has_amx(self) -> bool:
        return self.arch == "x86_64" and bool(self.flags & AMX_FLAGS)


@dataclass(frozen=True)
class WeightBuffers:
    """Whether llama.cpp may repack weights into its extra buffer types, and why."""

    extra: bool
    reason: str
    available: tuple[str, ...] | None = None  # the extra buffer types this llama.cpp build offers (None: unknown)

    def in_use(self) -> list[str]:
        """The buffer types weights can land in: the extra ones first (when on), then plain CPU memory."""
        return [*(self.available or ()), "CPU"] if self.extra else ["CPU"]

    def to_dict(self) -> dict:
        return {"repack": self.extra, "buffer_types": self.in_use(), "reason": self.reason,
                "available": list(self.available) if self.available is not None else None}


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor block of a /proc/cpuinfo text (x86 `flags`, ARM `Features`)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if "processor" in fields and ("flags" in fields or "features" in fields):
                break  # the first block is enough; ARM kernels put board lines after the last block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    if "flags" in fields or "vendor_id" in fields:
        arch = "x86_64"
        flags = fields.get("flags", "")
    elif "features" in fields or "cpu implementer" in fields:
        arch = "aarch64" if fields.get("cpu architecture", "8").strip() == "8" else "armv7l"
        flags = fields.get("features", "")
    else:
        arch, flags = "unknown", ""
    model = fields.get("model name") or fields.get("model") or fields.get("hardware") or arch
    return CpuInfo(arch=arch, model=model, flags=frozenset(flags.split()))


def host_cpu(path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This machine's CPU (an unreadable cpuinfo gives the architecture alone, no flags)."""
    try:
        cpu = parse_cpuinfo(path.read_text(errors="replace"))
    except OSError:
        cpu = CpuInfo(arch="unknown", model="", flags=frozenset())
    if cpu.arch == "unknown":
        cpu = CpuInfo(arch=platform.machine() or "unknown", model=cpu.model, flags=cpu.flags)
    return cpu


def decide(cpu: CpuInfo, available: tuple[str, ...] | None = None, override: str | None = None) -> WeightBuffers:
    """Repack unless the AMX buffer could be used (an AMX CPU and a build that offers it, or one we cannot ask)."""
    if override is not None:
        want = override.strip().lower()
        if want in ("on", "1", "true", "yes"):
            return WeightBuffers(True, f"{ENV}={override}: repacking forced on", available)
        if want in ("off", "0", "false", "no"):
            return WeightBuffers(False, f"{ENV}={override}: repacking forced off", available)
        if want not in ("", "auto"):
            raise HublabError(f"{ENV}={override!r} is not a setting; use on, off or auto (the default)")
    if cpu.has_amx and (available is None or any("AMX" in name.upper() for name in available)):
        return WeightBuffers(False, "this CPU has Intel AMX and llama.cpp's AMX buffer crashes on Q4_K weights "
                                    f"({ISSUE}): weights stay in plain CPU buffers", available)
    if cpu.has_amx:
        return WeightBuffers(True, "this CPU has Intel AMX but this llama.cpp build has no AMX buffer: "
                                   "repacked weights (CPU_REPACK) are safe", available)
    if cpu.arch in ("aarch64", "armv7l"):
        if cpu.flags & {"asimddp", "i8mm"}:
            return WeightBuffers(True, "ARM with dotprod: repacked Q4_0/Q4_K weights are the fast kernels here",
                                 available)
        return WeightBuffers(False, "ARM without dotprod (Cortex-A53, A72): llama.cpp has no repacked Q4 kernels "
                                    "for it, so the weights stay in the model file's pages (one copy)", available)
    return WeightBuffers(True, "repacked weights (CPU_REPACK) for the wide Q4_0/Q4_K kernels", available)


def extra_buffer_types() -> tuple[str, ...] | None:
    """The extra buffer types the loaded llama.cpp offers on the CPU (AMX, CPU_REPACK, ...); None if it cannot say."""
    try:
        import llama_cpp.llama_cpp as ll

        lib = ll._lib  # ggml's symbols resolve through llama's handle (its dependencies, or linked in)
        lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.ggml_backend_buft_name.restype = ctypes.c_char_p
        lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
        dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        if not dev:
            return None
        fn = lib.ggml_backend_reg_get_proc_address(lib.ggml_backend_dev_backend_reg(dev),
                                                   b"ggml_backend_dev_get_extra_bufts")
        if not fn:
            return ()
        bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
        names = []
        i = 0
        while bufts and bufts[i]:
            names.append(lib.ggml_backend_buft_name(bufts[i]).decode("utf-8", "replace"))
            i += 1
        return tuple(names)
    except (ImportError, AttributeError, OSError):
        return None


def for_profile(host: WeightBuffers, cpu: str, dotprod: bool, profile: str, override: str | None = None
                ) -> WeightBuffers:
    """The host's decision for a runtime on board profile `profile` (its `cpu` and `dotprod` as the profile says)."""
    if not host.extra or override not in (None, "", "auto") or not cpu.startswith("cortex-a") or dotprod:
        return host
    return WeightBuffers(False, f"profile {profile}: a {cpu.title()} has no dotprod, so llama.cpp has no repacked "
                                "Q4 kernels there and the weights stay in the model file's pages (one copy)",
                         host.available)


_lock = threading.Lock()
_decision: WeightBuffers | None = None
_this_load: contextvars.ContextVar[bool | None] = contextvars.ContextVar("hublab_use_extra_bufts", default=None)
_devices: contextvars.ContextVar[object] = contextvars.ContextVar("hublab_devices", default=None)


def configure_llama() -> WeightBuffers:
    """Make every llama.cpp model load in this process follow the host's decision (again: the same answer).

    llama-cpp-python's `Llama` takes no `use_extra_bufts` argument; it starts from
    `llama_model_default_params()`, so that function is wrapped to fill the field in.
    """
    global _decision
    with _lock:
        if _decision is None:
            import llama_cpp
            import llama_cpp.llama_cpp as ll

            decision = decide(host_cpu(), extra_buffer_types(), os.environ.get(ENV))
            original = ll.llama_model_default_params

            def default_params():
                params = original()
                wanted = _this_load.get()
                params.use_extra_bufts = decision.extra if wanted is None else wanted
                devices = _devices.get()
                if devices is not None:  # ggml devices for this load alone (RPC workers: engine/rpc.py)
                    params.devices = ctypes.cast(devices, ctypes.c_void_p)
                return params

            ll.llama_model_default_params = default_params
            llama_cpp.llama_model_default_params = default_params
            _decision = decision
        return _decision


def load_llama(path, extra: bool | None = None, devices: list[int] | None = None, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)` with this host's weight buffers (see the module's docstring), or with
    extra buffer types on/off for this load alone (`extra`, from `for_profile`). `devices`: the ggml devices the
    layers go to (llama_model_params.devices; RPC workers, engine/rpc.py), with n_gpu_layers and tensor_split."""
    host = configure_llama()
    from llama_cpp import Llama

    token = _this_load.set(None if extra is None else host.extra and extra)  # never on where the host says off
    array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None) if devices else None  # NULL-terminated
    dev_token = _devices.set(array)
    try:
        return Llama(model_path=str(path), **kwargs)
    finally:
        _this_load.reset(token)
        _devices.reset(dev_token)


def llama_server_flags() -> list[str]:
    """The flags that give a llama-server the same weight buffers as hublab on this host."""
    return [] if configure_llama().extra else ["--no-repack"]
