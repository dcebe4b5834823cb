"""The model registry: every model is an ONNX file plus its JSON model card, and one small state
file says which model is in production and what stage each of the others is in.

Two directories are searched for models, in order: the node's own ``<data_dir>/models`` (where
``branchguard train`` and ``retrain`` write, and where the state file lives) and the shipped
``models_dir`` (read-only; ``models/if-v1`` ships with the package). With no state file the
production model is ``settings.model_version``, so a fresh node serves the shipped model.

The state file ``<data_dir>/models/registry.json`` holds the ``production`` pointer, the
history of earlier production versions (for rollback) and each model's current stage
(``candidate``, ``shadow``, ``production``, ``retired``). The card's own ``stage`` is the stage
the model was registered with; the state file is the authority after that.

Every change is one read-modify-write under an exclusive ``flock`` on ``registry.lock``, and
the new state is written to a temporary file, fsynced, and renamed over the old one
(``os.replace``), then the directory is fsynced: a reader, or a node restarted after a crash at
any instant, sees either the old state or the new one, never a torn file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import logs
from ..errors import ModelError
from ..settings import Settings
from .model import Model, file_sha256

log = logs.get("appliance.registry")

STAGES = ("candidate", "shadow", "production", "retired")
STATE_FILE = "registry.json"
LOCK_FILE = "registry.lock"


def utc_now() -> str:
    """Now as RFC 3339 in UTC, to the second (``2026-12-01T10:00:56Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RegistryState:
    """What ``registry.json`` holds. ``history`` is oldest first and excludes ``production``."""

    production: str
    history: tuple[str, ...] = ()
    stages: dict[str, str] = field(default_factory=dict)
    changed_at: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"production": self.production, "history": list(self.history),
                "stages": dict(sorted(self.stages.items())), "changed_at": self.changed_at,
                "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RegistryState:
        return cls(production=str(data["production"]),
                   history=tuple(str(v) for v in data.get("history", [])),
                   stages={str(k): str(v) for k, v in data.get("stages", {}).items()},
                   changed_at=data.get("changed_at"), reason=data.get("reason"))


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that no reader or crash ever sees a partial file:
    temp file in the same directory, fsync, ``os.replace``, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Registry:
    """Models in ``root`` (writable) and ``shipped`` (read-only), and the production pointer."""

    def __init__(self, root: Path, shipped: Path, default_version: str) -> None:
        self.root = root
        self.shipped = shipped
        self.default_version = default_version

    @classmethod
    def of(cls, settings: Settings) -> Registry:
        return cls(settings.data_dir / "models", settings.models_dir, settings.model_version)

    # --- reading ------------------------------------------------------------------------

    def locate(self, version: str) -> Path:
        """The directory holding ``<version>.onnx`` and ``<version>.json``."""
        for directory in (self.root, self.shipped):
            if (directory / f"{version}.onnx").exists() and (directory / f"{version}.json").exists():
                return directory
        raise ModelError("model not found", field="version", value=version,
                         hint=f"see 'branchguard models list'; looked in {self.root} and "
                              f"{self.shipped}")

    def versions(self) -> list[str]:
        """Every registered version (node models first, then shipped), sorted by name."""
        found: set[str] = set()
        for directory in (self.root, self.shipped):
            if directory.is_dir():
                found.update(p.stem for p in directory.glob("*.json")
                             if p.name != STATE_FILE and p.with_suffix(".onnx").exists())
        return sorted(found)

    def card(self, version: str) -> dict[str, Any]:
        """The model card as stored, with ``stage`` set to the model's current stage."""
        path = self.locate(version) / f"{version}.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card is not JSON: {exc}", field="model_card",
                             value=str(path)) from exc
        data["stage"] = self.stage(version, data.get("stage"))
        return data

    def state(self) -> RegistryState:
        """The current state; the default (shipped model in production) when there is none."""
        path = self.root / STATE_FILE
        try:
            return RegistryState.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return RegistryState(production=self.default_version)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"registry state is unreadable: {exc}", field="registry",
                             value=str(path), hint="restore it from a backup, or delete it "
                             "to fall back to the configured model_version") from exc

    def production(self) -> str:
        """The version the scorer serves."""
        return self.state().production

    def stage(self, version: str, registered: str | None = None,
              state: RegistryState | None = None) -> str:
        state = state or self.state()
        if version == state.production:
            return "production"
        current = state.stages.get(version) or registered or "candidate"
        return "candidate" if current == "production" else current

    def shadow(self) -> str | None:
        """The model in the ``shadow`` stage, if any (at most one)."""
        state = self.state()
        shadows = [v for v, s in state.stages.items() if s == "shadow" and v != state.production]
        return shadows[0] if shadows else None

    def load(self, version: str) -> Model:
        """The model, with its ONNX file checked against the card's sha256."""
        return Model.load(self.locate(version), version)

    def listing(self) -> list[dict[str, Any]]:
        """One summary row per version: stage, created, parent, algorithm, key metrics."""
        state = self.state()
        rows = []
        for version in self.versions():
            card = self.card(version)
            metrics = card.get("metrics") or {}
            rows.append({"version": version, "stage": self.stage(version, card.get("stage"),
                                                                 state),
                         "created": card.get("created"), "parent": card.get("parent_version"),
                         "algorithm": card.get("algorithm", ""),
                         "average_precision": metrics.get("average_precision"),
                         "f1": metrics.get("f1")})
        return rows

    # --- changing -----------------------------------------------------------------------

    def register(self, onnx_path: Path, card: dict[str, Any]) -> Path:
        """Copy a model into ``root`` under its card's version (stage from the card, default
        ``candidate``). Refuses an existing version and a card whose sha256 is not the file's."""
        version = str(card["version"])
        if file_sha256(onnx_path) != card.get("sha256"):
            raise ModelError("ONNX file does not match its model card", field="sha256",
                             value=version)
        try:
            self.locate(version)
        except ModelError:
            pass
        else:
            raise ModelError("a model of that version exists", field="version", value=version,
                             hint="choose another version")
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / f"{version}.onnx"
        if onnx_path.resolve() != target.resolve():
            shutil.copyfile(onnx_path, target)
        card = {**card, "stage": card.get("stage") or "candidate"}
        write_atomically(self.root / f"{version}.json", json.dumps(card, indent=2) + "\n")
        return target

    @contextmanager
    def _locked(self) -> Iterator[RegistryState]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self.state()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _save(self, state: RegistryState) -> None:
        write_atomically(self.root / STATE_FILE, json.dumps(state.to_json(), indent=2) + "\n")

    def promote(self, version: str, reason: str = "manual") -> RegistryState:
        """Make ``version`` production; the previous production model becomes ``retired`` and
        is remembered for :meth:`rollback`. The model must load (sha256 checked) first."""
        self.load(version)
        with self._locked() as state:
            if state.production == version:
                return state
            stages = {**state.stages, state.production: "retired"}
            stages.pop(version, None)
            new = RegistryState(production=version,
                                history=(*state.history, state.production)[-50:],
                                stages=stages, changed_at=utc_now(), reason=reason)
            self._save(new)
        log.info("model.promoted", txn_id=None, version=version, previous=state.production,
                 reason=reason)
        return new

    def rollback(self, reason: str = "rollback") -> RegistryState:
        """Put the previous production model back; the current one becomes ``retired``."""
        with self._locked() as state:
            if not state.history:
                raise ModelError("nothing to roll back to", field="history",
                                 hint="no earlier production model is recorded")
            previous = state.history[-1]
            stages = {**state.stages, state.production: "retired"}
            stages.pop(previous, None)
            new = RegistryState(production=previous, history=state.history[:-1],
                                stages=stages, changed_at=utc_now(), reason=reason)
            self._save(new)
        log.info("model.rolled_back", txn_id=None, version=previous,
                 previous=state.production, reason=reason)
        return new

    def set_stage(self, version: str, stage: str, reason: str = "manual") -> RegistryState:
        """Move a non-production model to ``candidate``, ``shadow`` or ``retired`` (at most one
        shadow: an earlier shadow goes back to ``candidate``). Use :meth:`promote` for
        production."""
        if stage not in STAGES or stage == "production":
            raise ModelError("cannot set that stage", field="stage", value=stage,
                             hint="use candidate, shadow or retired; 'promote' for production")
        self.locate(version)
        with self._locked() as state:
            if version == state.production:
                raise ModelError("that model is in production", field="version",
                                 value=version, hint="promote another model first")
            stages = dict(state.stages)
            if stage == "shadow":
                stages = {v: ("candidate" if s == "shadow" else s) for v, s in stages.items()}
            stages[version] = stage
            new = RegistryState(production=state.production, history=state.history,
                                stages=stages, changed_at=utc_now(), reason=reason)
            self._save(new)
        log.info("model.stage_changed", txn_id=None, version=version, stage=stage)
        return new
