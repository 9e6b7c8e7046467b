"""llama.cpp's own programs, built from the very llama.cpp the pinned llama-cpp-python vendors.

llama-cpp-python ships the libraries only. Its sdist carries the whole llama.cpp tree, so the tools hublab runs
beside it (ggml's RPC worker, llama-server for comparisons) are built from there once, with `-DGGML_RPC=ON`,
and cached:

    ~/.cache/hublab/llama-server/llama_cpp_python-<version>/vendor/llama.cpp/build/bin/
        ggml-rpc-server   the RPC worker (`hublab rpc-worker` runs it)
        libggml-rpc.so    the RPC client: a split base's process loads it beside llama-cpp-python's ggml
        llama-server      llama.cpp's HTTP server (benchmarks)

The same source means the same RPC protocol version on both ends and the same kernels. `HUBLAB_LLAMA_TOOLS`
names a directory of prebuilt tools instead (a worker card built elsewhere).

    build_tools(["rpc-server", "llama-server"])   # ~10 min on 2 cores the first time
    tool_path("rpc-server")                       # None until built
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from ..errors import HublabError

ENV = "HUBLAB_LLAMA_TOOLS"
# tool name -> (cmake target, file under build/bin)
TOOLS = {"rpc-server": ("ggml-rpc-server", "ggml-rpc-server"), "llama-server": ("llama-server", "llama-server"),
         "llama-bench": ("llama-bench", "llama-bench"), "rpc-client": ("ggml-rpc", "libggml-rpc.so")}
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DGGML_RPC=ON"]


class ToolsError(HublabError):
    """llama.cpp's tools are missing and cannot be built here."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hublab" / "llama-server"


def source_tree() -> Path:
    """The llama.cpp tree vendored in the pinned llama-cpp-python's sdist (unpacked under the cache dir)."""
    version = metadata.version("llama_cpp_python")
    return cache_dir() / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def _bin_dir() -> Path:
    prebuilt = os.environ.get(ENV)
    return Path(prebuilt).expanduser() if prebuilt else source_tree() / "build" / "bin"


def _rpc_on(tree: Path) -> bool:
    cache = tree / "build" / "CMakeCache.txt"
    return cache.is_file() and "GGML_RPC:BOOL=ON" in cache.read_text(errors="replace")


def tool_path(name: str) -> Path | None:
    """The built tool `name` (rpc-server, llama-server, llama-bench, rpc-client), or None when not built yet."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    path = _bin_dir() / TOOLS[name][1]
    if not path.is_file():
        return None
    if not os.environ.get(ENV) and not _rpc_on(source_tree()):
        return None  # a tree built before RPC was switched on: its libraries differ from the RPC build's
    return path


def require(name: str) -> Path:
    """The built tool `name`, or a one-line error saying how to build it."""
    path = tool_path(name)
    if path is None:
        where = f"{ENV}={os.environ[ENV]}" if os.environ.get(ENV) else str(source_tree() / "build" / "bin")
        raise ToolsError(f"llama.cpp's {name} is not built ({where}); build it once with "
                         f"`hublab rpc-worker --build` (about 10 minutes on 2 cores)")
    return path


def _missing_build_tools() -> list[str]:
    lacking = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    return lacking + ([] if shutil.which("make") or shutil.which("ninja") else ["make"])


def _fetch_source() -> Path:
    version = metadata.version("llama_cpp_python")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tree = source_tree()
    if tree.is_dir():
        return tree
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                            "--no-binary", ":all:", "-d", str(cache), "-q"], capture_output=True, text=True)
        if r.returncode != 0 or not sdist.is_file():
            said = (r.stderr or r.stdout).strip().splitlines()
            raise ToolsError(f"could not download the llama-cpp-python {version} sdist "
                             f"({said[-1] if said else r.returncode}); check the network or set {ENV}")
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return tree


def build_tools(names: list[str] | tuple[str, ...] = ("rpc-server", "llama-server"), quiet: bool = False
                ) -> dict[str, Path]:
    """Build the tools `names` that are not built yet (one build tree, RPC on; a lock keeps two builds apart);
    returns name -> path."""
    for name in names:
        if name not in TOOLS:
            raise ToolsError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    found = {name: tool_path(name) for name in names}
    if all(found.values()):
        return found  # type: ignore[return-value]
    if os.environ.get(ENV):
        missing = [n for n, p in found.items() if p is None]
        raise ToolsError(f"{ENV}={os.environ[ENV]} has no {', '.join(missing)}; put the built tools there or unset it")
    lacking = _missing_build_tools()
    if lacking:
        raise ToolsError(f"building llama.cpp's tools needs {', '.join(lacking)}; install them (apt-get install "
                         f"cmake g++ make) or set {ENV} to a directory of built tools")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same tree
        found = {name: tool_path(name) for name in names}
        todo = [n for n, p in found.items() if p is None]
        if todo:
            tree = _fetch_source()
            if not quiet:
                print(f"building llama.cpp's {', '.join(todo)} in {tree} (about 10 minutes on 2 cores, once)",
                      file=sys.stderr)
            out = subprocess.DEVNULL if quiet else sys.stderr
            steps = [["cmake", "-B", "build", *CMAKE_FLAGS],
                     ["cmake", "--build", "build", f"-j{os.cpu_count() or 2}", "--target",
                      *sorted({TOOLS[n][0] for n in todo})]]
            for step in steps:
                r = subprocess.run(step, cwd=tree, stdout=out, stderr=subprocess.PIPE, text=True)
                if r.returncode != 0:
                    said = [line for line in r.stderr.splitlines() if "error" in line.lower()] or r.stderr.splitlines()
                    raise ToolsError(f"building llama.cpp's tools failed in {tree} ({' '.join(step[:3])}: "
                                     f"{said[0].strip()[:200] if said else r.returncode}); see the output above")
            found = {name: tool_path(name) for name in names}
            missing = [n for n, p in found.items() if p is None]
            if missing:
                raise ToolsError(f"the build in {tree} did not produce {', '.join(missing)}")
    return found  # type: ignore[return-value]


def rpc_protocol() -> tuple[int, int, int]:
    """The ggml-rpc protocol version of the vendored llama.cpp (RPC_PROTO_*_VERSION in ggml-rpc.h)."""
    header = source_tree() / "ggml" / "include" / "ggml-rpc.h"
    if os.environ.get(ENV) and (Path(os.environ[ENV]) / "ggml-rpc.h").is_file():
        header = Path(os.environ[ENV]) / "ggml-rpc.h"
    try:
        text = header.read_text(errors="replace")
    except OSError:
        return PROTOCOL
    parts = [re.search(rf"#define\s+RPC_PROTO_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return tuple(int(m.group(1)) for m in parts) if all(parts) else PROTOCOL  # type: ignore[return-value]


PROTOCOL = (7, 0, 0)  # llama-cpp-python 0.3.36's ggml-rpc.h, for a host without the source tree


if __name__ == "__main__":  # scripts/test: python -m hublab.runtime.engine.llamacpp rpc-server rpc-client llama-server
    try:
        for tool, where in build_tools(sys.argv[1:] or ["rpc-server", "rpc-client"]).items():
            print(f"{tool}: {where}")
    except ToolsError as exc:
        print(f"hublab: error: {exc}", file=sys.stderr)
        sys.exit(1)
