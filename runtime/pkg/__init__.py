"""`hublab pkg`: build, sign, publish, install, verify, remove, list, search, show and update model packages.

Every verb is a function with the command's arguments (`install("python-expert:1.0", registry=...)`)
that returns data and prints nothing; `cli.py` is the thin layer that prints it. One module per job:

    author.py   keygen, build, publish              (making packages and putting them in a registry)
    install.py  install, check, update, verify, remove, list_packages   (the installed store's verbs)
    catalog.py  search, show                        (reading a registry)
    store.py    the installed store: records, lock, staging, commit, recovery after a kill -9
    fit.py      which variant fits the board
    cache.py    downloaded blobs, named by digest, resumed where a download stopped
    context.py  the settings every verb runs with; a disk error becomes one line
    fs.py       lstat-based path checks, fsync, the atomic swap
    cli.py      the arguments and the text (hublab pkg, and the hublab> shell's pkg)

Registries (a plain directory or any OCI registry) are runtime/pkg/registry.py; packages are signed (ed25519),
digest-verified, fit-checked against the board before download, and installed atomically.
"""
from .author import BuildResult, PublishResult, build, keygen, publish
from .catalog import search, show
from .context import PackageError, configured_registry
from .fit import Choice
from .install import (InstallResult, UpdateResult, VerifyReport, VerifyResult, check, install, list_packages, remove,
                      update, verify)
from .store import Installed

__all__ = ["keygen", "build", "publish", "install", "check", "update", "verify", "remove", "list_packages", "search",
           "show", "configured_registry", "PackageError", "BuildResult", "PublishResult", "InstallResult", "Choice",
           "UpdateResult", "VerifyReport", "VerifyResult", "Installed"]
