"""The blob cache: downloads named by digest, checked against it, resumed where a download stopped.

In one directory (the store's `.hublab/blobs`, or a scratch folder when publish copies between
registries), a blob is `sha256-<hex>` once complete and checked, and `sha256-<hex>.partial` while it
arrives; the partial file is kept when a transfer breaks off, so the next run continues it (HTTP Range
on an OCI registry). Only this module knows those names.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .manifest import sha256_file
from .registry import CHUNK, RESUMES, Descriptor, Interrupted, Progress, Registry, RegistryError
from .fs import fsync_path, path_kind, remove_any


@dataclass
class Fetched:
    path: Path
    downloaded: int   # bytes that crossed the wire this time
    reused: int       # bytes already on disk from an interrupted download (or a finished one)


class BlobCache:
    """Blobs under `root`, each named by its digest."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        """Where the complete, checked blob `digest` is kept."""
        return self.root / f"sha256-{digest.split(':', 1)[-1]}"

    def partial(self, digest: str) -> Path:
        """Where a download of `digest` that is under way (or was cut off) is kept."""
        return self.root / f"sha256-{digest.split(':', 1)[-1]}.partial"

    def drop_partials(self, digests) -> None:
        """Forget the partial downloads of `digests` (their blobs are installed: nothing is left to resume)."""
        for digest in digests:
            self.partial(digest).unlink(missing_ok=True)

    def fetch(self, reg: Registry, name: str, desc: Descriptor, *, label: str = "",
              progress: Progress | None = None) -> Fetched:
        """Download blob `desc` of package `name`, resuming a partial file, and check its sha256 before
        returning it (fsync'd, at `self.path(desc.digest)`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final, partial = self.path(desc.digest), self.partial(desc.digest)
        label = label or desc.digest[:19]
        for p in (final, partial):
            if path_kind(p) not in ("file", "missing"):
                remove_any(p)  # the cache is ours: a link or directory there is never followed or kept
        if final.is_file() and final.stat().st_size == desc.size:
            if sha256_file(final) == desc.hex:
                if progress:
                    progress(label, desc.size, desc.size)
                return Fetched(final, 0, desc.size)
            final.unlink()
        resumes = 0
        fresh_tries = 0
        while True:
            have = partial.stat().st_size if partial.exists() else 0
            if have > desc.size:
                partial.unlink()
                have = 0
            h = hashlib.sha256()
            if have:
                with open(partial, "rb") as f:
                    while block := f.read(CHUNK):
                        h.update(block)
            downloaded = 0
            try:
                with reg.open_blob(name, desc.digest, have) as (start, chunks):
                    if start != have:  # the server ignored Range: start over
                        have, h = 0, hashlib.sha256()
                    reused = have
                    with open(partial, "r+b" if have else "wb") as out:
                        out.seek(have)
                        out.truncate()
                        done = have
                        if progress:
                            progress(label, done, desc.size)
                        try:
                            for chunk in chunks:
                                if done + len(chunk) > desc.size:
                                    break  # more bytes than the descriptor promises: corrupt, caught below
                                out.write(chunk)
                                h.update(chunk)
                                done += len(chunk)
                                downloaded += len(chunk)
                                if progress:
                                    progress(label, done, desc.size)
                        finally:  # what arrived is kept for the resume, also when the transfer broke off
                            out.flush()
                            os.fsync(out.fileno())
            except Interrupted:
                # cut off mid-way: resume from what arrived, a few times, while each try gains bytes
                resumes += 1
                if downloaded == 0 or resumes > RESUMES:
                    raise
                continue
            if done == desc.size and h.hexdigest() == desc.hex:
                os.replace(partial, final)
                fsync_path(self.root)
                return Fetched(final, downloaded, reused)
            partial.unlink(missing_ok=True)
            fresh_tries += 1
            if not reused or fresh_tries > 1:
                break
            # The bytes kept from an earlier attempt were wrong (or the blob changed): one fresh try.
        what = "does not match its sha256" if done == desc.size else f"has {done} bytes, not {desc.size}"
        raise RegistryError(f"{reg.location} {name}: {label} ({desc.digest[:19]}…) {what}; the registry content "
                            "is corrupt or was tampered with; nothing was installed")

