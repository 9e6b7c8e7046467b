"""Variants and the board fit: which of a package's variants fit a board profile, best first."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import format_size
from .manifest import FileEntry, Manifest
from ..engine.profiles import Profile
from .context import PackageError

GGUF_ROLES = ("model", "adapter")


@dataclass
class Choice:
    """One way to install a package on a board: a variant, its files, and whether it fits."""
    variant: str
    quant: str
    files: list[FileEntry]
    size: int
    memory: int
    largest: int
    fits: bool
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = [f.path for f in self.files]
        return d


def plan(m: Manifest, profile: Profile) -> list[Choice]:
    """Every variant of `m` with its fit verdict on `profile`, best choice first."""
    options = [(v.name, v.quant, v.memory) for v in m.variants] or [("", "", 0)]
    choices = []
    for name, quant, declared in options:
        files = m.files_for(name)
        ggufs = [f for f in files if f.role in GGUF_ROLES]
        largest = max((f.size for f in ggufs), default=0)
        memory = declared or sum(f.size for f in ggufs)
        what = f"variant {name}" if name else "it"
        if profile.max_model_size and largest > profile.max_model_size:
            big = max(ggufs, key=lambda f: f.size)
            fits, reason = False, (f"{what}: {big.path} is {format_size(largest)}, over {profile.name}'s largest "
                                   f"model size {format_size(profile.max_model_size)}")
        elif profile.model_budget and memory > profile.model_budget:
            fits, reason = False, (f"{what} needs {format_size(memory)} of model memory, over {profile.name}'s "
                                   f"budget {format_size(profile.model_budget)}")
        else:
            fits, reason = True, (f"{what} needs {format_size(memory)} of {format_size(profile.model_budget)} "
                                  f"on {profile.name}")
        choices.append(Choice(variant=name, quant=quant, files=files, size=sum(f.size for f in files),
                              memory=memory, largest=largest, fits=fits, reason=reason))
    prefs = [q.upper() for q in profile.preferred_quants]

    def rank(c: Choice):
        # Fitting first; then the profile's quant preference; then the biggest (least lossy) that fits.
        pref = prefs.index(c.quant.upper()) if c.quant.upper() in prefs else len(prefs)
        return (not c.fits, pref, -c.memory)

    return sorted(choices, key=rank)


def select_variant(m: Manifest, profile: Profile, wanted: str | None = None) -> Choice:
    choices = plan(m, profile)
    if wanted:
        hit = [c for c in choices if c.variant == wanted or c.quant.upper() == wanted.upper()]
        if not hit:
            have = ", ".join(c.variant for c in choices) or "none"
            raise PackageError(f"{m.name}: no variant {wanted!r} (variants: {have}); pick one of those")
        choices = hit
    best = choices[0]
    if not best.fits:
        smallest = min(choices, key=lambda c: c.memory)
        raise PackageError(f"{m.name} {m.version} does not fit board profile {profile.name}: {smallest.reason}; "
                           "nothing was downloaded (choose a smaller variant or another --profile)")
    return best
