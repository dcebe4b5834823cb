"""Which modules run compiled by mypyc, and the switch back to their Python source.

``pip install`` (and so ``make run`` and ``make test``) compiles the modules in
:data:`MODULES` into C extensions with mypyc, from the same strictly typed source that mypy
checks, and records the SHA-256 of each source it compiled in :data:`STAMP` (``setup.py``).
Python imports an extension before a ``.py`` of the same name, so :func:`choose`, run when
``appliance`` is imported, decides which of the two each of these modules is:

- the extension, when it was built from the source now beside it;
- the source, when ``BRANCHGUARD_PURE_PYTHON`` is set (to anything but ``""`` or ``0``), when
  there is no extension (no C compiler at install time: the install falls back to pure
  Python), or when the extension was built from another version of the source (an editable
  install whose file has changed since: ``pip install -e .`` again compiles it anew).

A module chosen as source is found at its ``.py`` by a finder placed first on
``sys.meta_path``, so its first import (whoever makes it) loads the source. Both must give bit-identical results: tests/test_compiled.py
runs the same stream through each. This module uses only the standard library (setup.py reads
:data:`MODULES` from it before anything is installed).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

MODULES: tuple[str, ...] = ("appliance.scoring.features",)
"""The modules compiled at install time: those where pure Python was measured to be the cost
(docs/benchmarks.md, "Compiled with mypyc")."""
PURE_ENV = "BRANCHGUARD_PURE_PYTHON"
"""Set (to anything but ``""`` or ``0``) to run every module in :data:`MODULES` from its
Python source, and to install without compiling them."""
STAMP = "_compiled.json"
"""Written by setup.py into the package directory after a successful compile: module name ->
SHA-256 of the source it was compiled from."""

COMPILED = "compiled"
ASKED = "pure: BRANCHGUARD_PURE_PYTHON is set"
NOT_BUILT = ("pure: not compiled at install (no C compiler, mypyc failed, or BRANCHGUARD_PURE_PYTHON"
             " was set then)")
STALE = "pure: compiled from another version of the source (pip install -e . again)"

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
status: dict[str, str] = {}
"""What :func:`choose` decided for each module of :data:`MODULES`: one of the constants above."""


def pure_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether ``BRANCHGUARD_PURE_PYTHON`` asks for the Python source."""
    return env.get(PURE_ENV, "").strip() not in ("", "0")


def source_path(name: str) -> Path:
    """The ``.py`` file of module ``name`` (one of this package's)."""
    return _PACKAGE_ROOT.joinpath(*name.split(".")).with_suffix(".py")


def extension_path(name: str) -> Path | None:
    """The compiled extension of module ``name`` beside its source, if there is one."""
    source = source_path(name)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def source_digest(path: Path) -> str:
    """SHA-256 of a source file, as setup.py records it in the stamp."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decide(name: str, env: Mapping[str, str] = os.environ) -> str:
    """Which of the compiled extension and the Python source module ``name`` should be."""
    if pure_requested(env):
        return ASKED
    if extension_path(name) is None:
        return NOT_BUILT
    try:
        stamp = json.loads((_PACKAGE_ROOT / "appliance" / STAMP).read_text())
    except (OSError, ValueError):
        return STALE
    if stamp.get(name) != source_digest(source_path(name)):
        return STALE
    return COMPILED


def load_source(name: str) -> ModuleType:
    """A fresh module object executed from ``name``'s ``.py`` source, under the same name (so
    its relative imports resolve), *not* registered in ``sys.modules``: the parity test and
    the benchmark hold it beside the compiled one."""
    spec = importlib.util.spec_from_file_location(name, source_path(name))
    if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has one
        raise ImportError(f"cannot load {name} from its source", name=name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the modules chosen to run from source at their ``.py``, ahead of the finders
    that would find the extension (first on ``sys.meta_path``)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


_finder = _SourceFinder()


def choose(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Decide, for each module of :data:`MODULES`, between its extension and its source, so
    that its first import loads the one chosen. Returns :data:`status`. Cheap (a stat, a
    small JSON file and a hash of the source); imports nothing."""
    for name in MODULES:
        status[name] = decision = decide(name, env)
        if decision == COMPILED:
            _finder.names.discard(name)
        else:
            _finder.names.add(name)
    if _finder.names and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return status


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from a C extension (mypyc's) rather than Python source."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)
