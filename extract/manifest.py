"""``manifest.json``: what an extraction directory holds and how it was made.

The manifest is the job's commit log. A shard counts as done only when its Parquet file was renamed into
place *and* the manifest (rewritten atomically after every shard) lists it with its row count and
SHA-256. A rerun trusts a shard only if its file still matches the recorded checksum (or size, with
``verify: size``); everything else is redone, so an interruption at any moment loses and duplicates
nothing. The *fingerprint* (dataset, detector file checksums, output-defining settings) must match for
a rerun to continue; otherwise :class:`ManifestMismatchError` refuses to mix outputs.

Layout::

    {"format": "softclip.extract", "version": 1,
     "fingerprint": {"dataset": ..., "weights_sha256": ..., "labelmap_sha256": ..., "settings": {...}},
     "detector": {"detector_id": ..., "feature_dim": ...},
     "shards": {"00000": {"status": "complete", "file": "00000.parquet", "rows": 50, "ok": 49,
                          "errors": {"corrupt": 1}, "boxes": 730, "bytes": 123456, "sha256": ..., ...},
                "00001": {"status": "unreadable", "error": "..."}},
     "totals": {...}, "runs": [{"started": ..., "seconds": ..., "images": ...}]}
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json, file_sha256

__all__ = ["MANIFEST_NAME", "Manifest", "ManifestMismatchError", "shard_totals"]

MANIFEST_NAME = "manifest.json"
_FORMAT, _VERSION = "softclip.extract", 1


class ManifestMismatchError(ValueError):
    """An output directory holds an extraction made with another dataset, detector or settings."""


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def shard_totals(shards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sums over the complete shards: images, ok, errors by reason, boxes, bytes, and per-image means."""
    done = [s for s in shards.values() if s.get("status") == "complete"]
    images = sum(s["rows"] for s in done)
    ok = sum(s["ok"] for s in done)
    errors: Counter = Counter()
    for s in done:
        errors.update(s["errors"])
    total_bytes = sum(s["bytes"] for s in done)
    boxes = sum(s["boxes"] for s in done)
    return {"shards_complete": len(done), "shards_unreadable": sum(s.get("status") == "unreadable"
                                                                    for s in shards.values()),
            "images": images, "ok": ok, "errors": dict(sorted(errors.items())), "boxes": boxes,
            "boxes_per_image": boxes / ok if ok else 0.0, "bytes": total_bytes,
            "bytes_per_image": total_bytes / images if images else 0.0}


class Manifest:
    """The manifest of one output directory; every change is written through :meth:`save`."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        """Read the manifest of an existing extraction directory (no fingerprint check)."""
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {out_dir} is not an extraction directory "
                                    "(run softclip extract into it first)")
        try:
            found = json.loads(path.read_text()).get("fingerprint", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            found = {}  # open() below names the problem
        return cls.open(out_dir, found)

    @classmethod
    def open(cls, out_dir: str | Path, fingerprint: dict[str, Any]) -> Manifest:
        """Load ``out_dir/manifest.json`` (or start one); refuse one with another fingerprint."""
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            return cls(path, {"format": _FORMAT, "version": _VERSION, "fingerprint": fingerprint,
                              "detector": {}, "shards": {}, "totals": {}, "runs": []})
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestMismatchError(f"{path}: not valid JSON ({err}); move the directory aside or "
                                        "choose another --out") from err
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ManifestMismatchError(f"{path}: not a softclip extraction manifest (version {_VERSION})")
        diffs = _differences(data["fingerprint"], fingerprint)
        if diffs:
            raise ManifestMismatchError(
                f"{path.parent} holds an extraction made differently ({'; '.join(diffs)}); refusing to mix "
                "outputs. Use another --out, or delete that directory to start over.")
        return cls(path, data)

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        """Shard name -> entry (see the module docstring)."""
        return self.data["shards"]

    def set_detector(self, detector_id: str, feature_dim: int) -> None:
        """Record the detector that produced the rows; a different one is refused."""
        new = {"detector_id": detector_id, "feature_dim": feature_dim}
        old = self.data["detector"]
        if old and old != new:
            raise ManifestMismatchError(
                f"{self.path}: made with detector {old}, this run's detector is {new}; refusing to mix "
                "outputs. Use another --out.")
        self.data["detector"] = new

    def verified(self, name: str, verify: str) -> bool:
        """Whether shard ``name`` is complete and its file still matches the recorded size and checksum."""
        entry = self.shards.get(name)
        if not entry or entry.get("status") != "complete":
            return False
        path = self.path.parent / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        return verify == "size" or file_sha256(path) == entry["sha256"]

    def record(self, name: str, entry: dict[str, Any]) -> None:
        """Set shard ``name``'s entry and save."""
        self.shards[name] = entry
        self.save()

    def add_run(self, run: dict[str, Any]) -> None:
        """Append a run's timings and save."""
        self.data["runs"].append(run)
        self.save()

    def save(self) -> None:
        """Write the manifest atomically (totals recomputed)."""
        self.data["shards"] = dict(sorted(self.shards.items()))
        self.data["totals"] = shard_totals(self.shards)
        atomic_write_json(self.path, self.data)
