"""Where hublab's files live: data shipped in the package, and the user's own data, state and logs.

Shipped data (the embedded default models, board profiles, the package schema, the systemd unit) is found
through the installed `hublab` package with importlib.resources, so a wheel and an editable checkout read
it the same way (the checkout's hublab/data/ links to the repo's models/, hardware-profiles/ and
packaging/). It is read-only: what the user installs, caches and logs goes to their own directories.

    $HUBLAB_HOME               one root for everything below, when set (a service, a test)
    ~/.local/share/hublab/     data: models/ (installed packages, the user's own TOMLs), registry/
    ~/.local/state/hublab/     state: history, llama.log
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


def state_home() -> Path:
    """$HUBLAB_HOME, else $XDG_STATE_HOME/hublab (~/.local/state/hublab): history and logs."""
    if os.environ.get("HUBLAB_HOME"):
        return Path(os.environ["HUBLAB_HOME"])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "hublab"


EMBEDDED_MODELS_DIR = embedded("models")
PROFILES_DIR = embedded("hardware-profiles")
SCHEMA_PATH = embedded("packaging/package.schema.json")
SYSTEMD_UNIT = embedded("packaging/hublab-agent.service")
