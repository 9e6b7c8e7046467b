"""Board profiles: how much memory a board gives models, how many threads, which quantizations suit it.

Profiles live in hardware-profiles/*.toml. The active one is detected from /proc/device-tree/model and
/proc/meminfo, or named in system.toml ([runtime] profile) or on the command line. On a machine that is
not a Pi, the `host` profile is computed from the machine's real memory and cores.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ConfigError, Key, check_sections, parse_size, read_toml, validate_section
from ..paths import PROFILES_DIR

PROFILE_SCHEMA = {
    "profile": {
        "name": Key(str, "", "profile name, same as the file stem"),
        "description": Key(str, "", "the board in words"),
        "device_tree_match": Key(str, "", "text /proc/device-tree/model starts with on this board"),
        "ram": Key(str, "", "installed RAM such as 4GB"),
        "model_budget": Key(str, "", "memory models may use, such as 3GB"),
        "cores": Key(int, 4, "CPU cores"),
        "threads": Key(int, 4, "llama.cpp threads"),
        "cpu": Key(str, "", "CPU core type"),
        "dotprod": Key(bool, False, "CPU has the Arm dot-product extension"),
        "preferred_quants": Key(list, [], "quantizations to prefer, best first"),
        "default_context": Key(int, 2048, "context window when a model does not set one"),
        "max_model_size": Key(str, "", "largest model file the board accepts"),
        "ubatch": Key(int, 256, "prompt tokens llama.cpp computes at once (its compute buffer is sized for this "
                                "many rows of logits: smaller saves memory, too small slows prompt reading)"),
    }
}


@dataclass
class Profile:
    name: str
    description: str
    ram: int
    model_budget: int
    cores: int
    threads: int
    preferred_quants: list[str]
    default_context: int
    max_model_size: int
    cpu: str = ""
    dotprod: bool = False
    ubatch: int = 256
    device_tree_match: str = ""
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_profile_file(path: Path) -> Profile:
    data, text = read_toml(path)
    check_sections(path, text, data, PROFILE_SCHEMA)
    p = validate_section(path, text, "profile", data.get("profile", {}), PROFILE_SCHEMA["profile"])
    sizes = {}
    for key in ("ram", "model_budget", "max_model_size"):
        try:
            sizes[key] = parse_size(p[key])
        except ValueError as exc:
            raise ConfigError(f"{path}: [profile] {key}: {exc}") from None
    if not 8 <= p["ubatch"] <= 4096:
        raise ConfigError(f"{path}: [profile] ubatch: {p['ubatch']} is out of range; give 8 to 4096 tokens (256 "
                          "suits most boards, 64 a 512 MB one)")
    return Profile(name=p["name"] or path.stem, description=p["description"], ram=sizes["ram"],
                   model_budget=sizes["model_budget"], cores=p["cores"], threads=p["threads"],
                   preferred_quants=list(p["preferred_quants"]), default_context=p["default_context"],
                   max_model_size=sizes["max_model_size"], cpu=p["cpu"], dotprod=p["dotprod"], ubatch=p["ubatch"],
                   device_tree_match=p["device_tree_match"], source=str(path))


def board_profiles(directory: Path = PROFILES_DIR) -> dict[str, Profile]:
    return {p.stem: load_profile_file(p) for p in sorted(directory.glob("*.toml"))}


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_limit() -> int:
    """Memory limit of our cgroup (v1 or v2), 0 when unlimited: a capped process must plan for the cap."""
    candidates = [Path("/sys/fs/cgroup/memory.max")]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                candidates.insert(0, Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "memory.limit_in_bytes")
            elif controllers == "":
                candidates.insert(0, Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max")
    except (OSError, ValueError):
        pass
    for c in candidates:
        try:
            value = c.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < (1 << 50):
            return int(value)
    return 0


def host_profile() -> Profile:
    """A profile for this machine from its real memory: models may use 70% of what is available."""
    info = _meminfo()
    total = info.get("MemTotal", 0) or 4 << 30
    available = info.get("MemAvailable", total)
    limit = _cgroup_limit()
    notes = []
    if limit and limit < available:
        available = limit
        notes.append(f"memory capped by cgroup at {limit >> 20} MiB")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    budget = int(available * 0.7)
    return Profile(name="host", description=f"this machine ({total >> 20} MiB RAM, {cores} cores)", ram=total,
                   model_budget=budget, cores=cores, threads=cores,
                   preferred_quants=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"], default_context=4096,
                   max_model_size=int(budget * 0.8), source="computed", notes=notes)


def detect_board(profiles: dict[str, Profile], model_text: str | None = None,
                 mem_total: int | None = None) -> Profile | None:
    """The Pi profile matching the device-tree model string, sized by installed memory; None off a Pi."""
    if model_text is None:
        try:
            model_text = Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace")
        except OSError:
            return None
    family = [p for p in profiles.values() if p.device_tree_match and model_text.startswith(p.device_tree_match)]
    if not family:
        return None
    mem_total = mem_total if mem_total is not None else _meminfo().get("MemTotal", 0)
    # MemTotal is a little under the nominal size (firmware and kernel reserve some): pick the smallest
    # board size that is at least what the kernel reports.
    family.sort(key=lambda p: p.ram)
    for p in family:
        if mem_total <= p.ram:
            return p
    return family[-1]


def active_profile(name: str = "auto", directory: Path = PROFILES_DIR) -> Profile:
    """The named profile, or the detected board, or the host profile."""
    if name in ("", "auto"):
        return detect_board(board_profiles(directory)) or host_profile()
    if name == "host":
        return host_profile()
    profiles = board_profiles(directory)
    if name not in profiles:
        close = difflib.get_close_matches(name, list(profiles) + ["host"], n=1)
        names = ", ".join(list(profiles) + ["host", "auto"])
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {names}"
        raise ConfigError(f"unknown profile {name!r}; {hint}")
    return profiles[name]


def resolve_profile(args_profile: str | None, system_profile: str = "auto") -> Profile:
    """Command line beats system.toml beats detection."""
    return active_profile(args_profile or system_profile)


def describe(p: Profile) -> str:
    from ..config import format_size

    lines = [f"profile      {p.name}  ({p.description})",
             f"ram          {format_size(p.ram)}",
             f"model budget {format_size(p.model_budget)}",
             f"largest model {format_size(p.max_model_size)}",
             f"cores/threads {p.cores}/{p.threads}"
             + (f"  ({p.cpu}{', dotprod' if p.dotprod else ''})" if p.cpu else ""),
             f"quants       {', '.join(p.preferred_quants)}",
             f"context      {p.default_context}",
             f"source       {p.source}"]
    lines += [f"note         {n}" for n in p.notes]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--all", action="store_true", help="list every known profile")
    parser.add_argument("--json", action="store_true", help="print JSON")


def cli(args) -> int:
    import json

    from ..config import load_system

    if args.all:
        profiles = list(board_profiles().values()) + [host_profile()]
        if args.json:
            print(json.dumps([p.to_dict() for p in profiles], indent=2))
        else:
            for p in profiles:
                print(f"{p.name:<12} ram {p.ram >> 20:>6} MiB  budget {p.model_budget >> 20:>6} MiB  "
                      f"ctx {p.default_context:>5}  {p.description}")
        return 0
    system = load_system()
    p = resolve_profile(args.profile, system.profile)
    from .rpc import split_bases

    splits = split_bases(system, p)  # bases split across RPC workers: what of them this board holds
    if args.json:
        print(json.dumps({**p.to_dict(), "split_bases": splits} if splits else p.to_dict(), indent=2))
        return 0
    print(describe(p))
    from ..config import format_size

    for s in splits:
        workers = ", ".join(f"{w['endpoint']} {format_size(w['bytes'])}" for w in s["workers"])
        print(f"split base   {s['name']}: {format_size(s['local']['total'])} here of the "
              f"{format_size(p.model_budget)} budget; workers {workers}")
    return 0
