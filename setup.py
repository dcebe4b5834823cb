"""The build: pyproject.toml declares the package; this adds the mypyc-compiled hot modules.

mypyc compiles each module of ``appliance.compiled.MODULES`` from its strictly typed source
into a C extension, installed beside the ``.py`` (which stays: ``BRANCHGUARD_PURE_PYTHON=1``
runs it). After a successful compile, ``appliance/_compiled.json`` records the SHA-256 of each
source, so that an editable install whose source has changed since runs the source, never a
stale extension (appliance/compiled.py).

The compile is optional: with no C compiler, with mypyc failing, or with
``BRANCHGUARD_PURE_PYTHON`` set, the install goes on with pure Python and says why in a
warning (``pip install -v`` shows it; the node's ``node.ready`` log line says which is used).
The generated C goes to ``build/``; none of it is committed (.gitignore).
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
_compiled: dict[str, Any] = runpy.run_path(str(HERE / "appliance" / "compiled.py"))
MODULES: tuple[str, ...] = _compiled["MODULES"]
SOURCES = [str(Path(*name.split(".")).with_suffix(".py")) for name in MODULES]


def _say(message: str) -> None:
    """A warning in the build's output (shown by ``pip install -v``)."""
    print(f"WARNING: branchguard: {message}; the modules {', '.join(MODULES)} run as pure "
          "Python (correct, slower)", file=sys.stderr)


def compiled_extensions() -> list[Extension]:
    """mypyc's extensions for MODULES, or none (with a warning) when it cannot make them."""
    if _compiled["pure_requested"](os.environ):
        _say(f"{_compiled['PURE_ENV']} is set, not compiling")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        _say(f"mypyc is not installed ({exc})")
        return []
    try:
        return list(mypycify(SOURCES, opt_level="3"))
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error
        _say(f"mypyc could not compile ({exc!r})")
        return []


class OptionalBuildExt(build_ext):
    """build_ext that runs mypyc only when it builds (not for metadata), falls back to pure
    Python instead of failing, and stamps what it compiled."""

    def finalize_options(self) -> None:
        if (self.distribution.ext_modules is PLACEHOLDER
                and not set(self.distribution.commands) <= METADATA_ONLY):
            self.distribution.ext_modules = compiled_extensions()
        super().finalize_options()

    def run(self) -> None:
        if not self.extensions or self.extensions is PLACEHOLDER:
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, or the compile or link failed
            self._remove_outputs()
            _say(f"the C compile failed ({exc})")
            return
        digests = {name: hashlib.sha256((HERE / source).read_bytes()).hexdigest()
                   for name, source in zip(MODULES, SOURCES)}
        self._stamp_path().write_text(json.dumps(digests, indent=1) + "\n")

    def _remove_outputs(self) -> None:
        """Never leave half a build (a shim without its library), nor an earlier build, in
        build/ or in the source tree (an editable install builds in one, copies to the other)."""
        inplace = self.inplace
        try:
            for self.inplace in (0, 1):
                for ext in self.extensions:
                    Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
                self._stamp_path().unlink(missing_ok=True)
        finally:
            self.inplace = inplace

    def _stamp_path(self) -> Path:
        """appliance/_compiled.json where this build puts the package (in place or build/)."""
        name = MODULES[0]
        return (Path(self.get_ext_fullpath(name)).parents[name.count(".") - 1]
                / _compiled["STAMP"])

    def get_outputs(self) -> list[str]:
        outputs = [path for path in super().get_outputs() if Path(path).exists()]
        if self.extensions and self._stamp_path().exists():
            outputs.append(str(self._stamp_path()))
        return outputs


PLACEHOLDER = [Extension(name, [source]) for name, source in zip(MODULES, SOURCES)]
"""Stands for mypyc's extensions until build_ext is finalized for a build: setuptools must
know before that there are extensions (to run build_ext, and tag the wheel for this
platform)."""
METADATA_ONLY = {"egg_info", "dist_info", "sdist"}
"""Commands that finalize build_ext (for its list of sources) but build nothing: they keep
the placeholder, which spares them mypyc's type check (pip runs setup.py three times for one
install, twice of them for metadata)."""

setup(ext_modules=PLACEHOLDER, cmdclass={"build_ext": OptionalBuildExt})
