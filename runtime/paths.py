"""Where hublab's files live: data shipped in the package, and the user's own data, state and logs.

Shipped data (the embedded default models, board profiles, the package schema, the systemd unit) is found
through the installed `hublab` package with importlib.resources, so a wheel and an editable checkout read
it the same way (the checkout's hublab/data/ links to the repo's models/, hardware-profiles/ and
packaging/). It is read-only: what the user installs, caches and logs goes to their own directories.

    $HUBLAB_HOME               one root for everything below, when set (a service, a test): data and
                               state in it, system.toml and signing.key in it, caches in cache/
    ~/.config/hublab/          config: system.toml (or $HUBLAB_CONFIG), signing.key
    ~/.local/share/hublab/     data: models/ (installed packages, the user's own TOMLs), registry/
    ~/.local/state/hublab/     state: history, llama.log
    ~/.cache/hublab/           caches: embeddings, dequantized training bases (hf/)
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def embedded(name: str) -> Path:
    """A file or folder shipped inside the package: 'models', 'hardware-profiles', 'packaging/...'."""
    # The package is installed as plain files (wheel or editable), never zipped: a Path is safe to hand to
    # code that globs, mmaps GGUFs and hands paths to llama.cpp.
    return Path(str(files("hublab").joinpath("data", *name.split("/"))))


def data_home() -> Path:
    """$HUBLAB_HOME, else $XDG_DATA_HOME/hublab (~/.local/share/hublab)."""
    if os.environ.get("HUBLAB_HOME"):
        return Path(os.environ["HUBLAB_HOME"])
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "hublab"


def user_models_dir() -> Path:
    """Where packages install and the user's own model TOMLs go unless [runtime] models_dir says otherwise."""
    return data_home() / "models"


def config_home() -> Path:
    """$HUBLAB_HOME, else $XDG_CONFIG_HOME/hublab (~/.config/hublab): system.toml and signing.key."""
    if os.environ.get("HUBLAB_HOME"):
        return Path(os.environ["HUBLAB_HOME"])
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "hublab"


def cache_home() -> Path:
    """$HUBLAB_HOME/cache, else $XDG_CACHE_HOME/hublab (~/.cache/hublab): files that can be made again."""
    if os.environ.get("HUBLAB_HOME"):
        return Path(os.environ["HUBLAB_HOME"]) / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hublab"


def state_home() -> Path:
    """$HUBLAB_HOME, else $XDG_STATE_HOME/hublab (~/.local/state/hublab): history and logs."""
    if os.environ.get("HUBLAB_HOME"):
        return Path(os.environ["HUBLAB_HOME"])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "hublab"


EMBEDDED_MODELS_DIR = embedded("models")
PROFILES_DIR = embedded("hardware-profiles")
SCHEMA_PATH = embedded("packaging/package.schema.json")
SYSTEMD_UNIT = embedded("packaging/hublab-agent.service")
