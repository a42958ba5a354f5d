"""``manifest.json``: what an extraction directory holds and how it was made.

The manifest is the job's commit log. A shard counts as done only when its Parquet file was renamed into
place *and* the manifest (rewritten atomically after every shard) lists it with its row count and
SHA-256. A rerun trusts a shard only if its file still matches the recorded checksum (or size, with
``verify: size``); everything else is redone, so an interruption at any moment loses and duplicates
nothing. The *fingerprint* (dataset, detector file checksums, output-defining settings) must match for
a rerun to continue; otherwise :class:`ManifestMismatchError` refuses to mix outputs. A manifest that
lists no shard yet (a first run failed before its first commit) takes the new fingerprint, with a warning.
A malformed manifest raises :class:`ManifestFormatError` naming the file and what is wrong.

Layout::

    {"format": "softclip.extract", "version": 1,
     "fingerprint": {"dataset": ..., "weights_sha256": ..., "labelmap_sha256": ..., "settings": {...}},
     "detector": {"detector_id": ..., "feature_dim": ...},
     "shards": {"00000": {"status": "complete", "file": "00000.parquet", "rows": 50, "ok": 49,
                          "errors": {"corrupt": 1}, "boxes": 730, "bytes": 123456, "sha256": ..., ...},
                "00001": {"status": "unreadable", "error": "..."}},
     "totals": {...}, "runs": [{"started": ..., "seconds": ..., "images": ...}],
     "source_failures": {"samples": 10, "downloaded": 8, "failed_to_download": 1, "failed_to_resize": 1,
                         "reasons": {"HTTP Error 404: File not found": 1, ...}}}

``source_failures`` is what img2dataset's side files record about the samples that never reached the
data files (absent for sources without them); see :func:`source_failure_totals`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from softclip.pipeline.io import atomic_write_json, file_sha256

__all__ = ["MANIFEST_NAME", "Manifest", "ManifestFormatError", "ManifestMismatchError", "shard_totals",
           "source_failure_totals"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_FORMAT, _VERSION = "softclip.extract", 1


class ManifestMismatchError(ValueError):
    """An output directory holds an extraction made with another dataset, detector or settings."""


class ManifestFormatError(ManifestMismatchError):
    """``manifest.json`` is not valid JSON or lacks what an extraction manifest holds."""


_ENTRY_KEYS = {"complete": {"file": str, "rows": int, "ok": int, "errors": dict, "boxes": int, "bytes": int,
                            "sha256": str},
               "unreadable": {"error": str}}
_PACKED_KEYS = {"file": str, "bytes": int, "sha256": str, "feature_sha256": str}


def _missing(obj: dict[str, Any], keys: dict[str, type]) -> list[str]:
    """Keys of ``obj`` that are absent or not of their type (a JSON true/false is no number)."""
    return [k for k, kind in keys.items() if not isinstance(obj.get(k), kind) or isinstance(obj.get(k), bool)]


def _entry_problem(name: str, entry: Any) -> str | None:
    """What is wrong with shard ``name``'s entry, or None."""
    status = entry.get("status") if isinstance(entry, dict) else None
    if status not in _ENTRY_KEYS:
        return f"shard {name}: status {status!r} is neither 'complete' nor 'unreadable'"
    if bad := _missing(entry, _ENTRY_KEYS[status]):
        return f"shard {name}: {', '.join(map(repr, bad))} missing or of the wrong type"
    packed = entry.get("packed")
    if packed is not None and (not isinstance(packed, dict) or _missing(packed, _PACKED_KEYS)):
        return f"shard {name}: 'packed' lacks one of {', '.join(map(repr, _PACKED_KEYS))}"
    return None


def _problem(data: Any) -> str | None:
    """What is wrong with a parsed manifest, or None when its structure is sound."""
    if not isinstance(data, dict):
        return f"the top level is a JSON {type(data).__name__}, not an object"
    if data.get("format") != _FORMAT or data.get("version") != _VERSION:
        return f"format/version is {data.get('format')!r}/{data.get('version')!r}, not {_FORMAT!r}/{_VERSION}"
    for key, kind in (("fingerprint", dict), ("detector", dict), ("shards", dict), ("runs", list)):
        if not isinstance(data.get(key), kind):
            return f"{key!r} is missing or not a JSON {'object' if kind is dict else 'array'}"
    return next(filter(None, (_entry_problem(n, e) for n, e in data["shards"].items())), None)


def _read(path: Path) -> dict[str, Any]:
    """The parsed, structurally checked manifest at ``path``."""
    advice = (f"delete {path.parent} (or {path.name} and every *.parquet and packed/ in it) to start over, "
              "or choose another --out")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestFormatError(f"{path}: not valid JSON ({err}); {advice}") from err
    problem = _problem(data)
    if problem:
        raise ManifestFormatError(f"{path}: not a softclip extraction manifest: {problem}; {advice}")
    return data


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


def source_failure_totals(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sum img2dataset's per-shard stats (:func:`pipeline.img2dataset.img2dataset_stats`): samples attempted,
    downloaded, failed to download / resize, and the failure reasons (its ``status_dict`` less success)."""
    reasons: Counter = Counter()
    for shard in stats.values():
        reasons.update({k: v for k, v in (shard.get("status_dict") or {}).items() if k != "success"})
    return {"samples": sum(s["count"] for s in stats.values()),
            "downloaded": sum(s.get("successes", 0) for s in stats.values()),
            "failed_to_download": sum(s.get("failed_to_download", 0) for s in stats.values()),
            "failed_to_resize": sum(s.get("failed_to_resize", 0) for s in stats.values()),
            "reasons": dict(sorted(reasons.items()))}


class Manifest:
    """The manifest of one output directory; every change is written through :meth:`save`."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        """Read the manifest of an existing extraction directory (no fingerprint check).

        Raises:
            FileNotFoundError: no ``manifest.json`` in ``out_dir``.
            ManifestFormatError: it is not a well-formed extraction manifest.
        """
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {out_dir} is not an extraction directory "
                                    "(run softclip extract into it first)")
        return cls(path, _read(path))

    @classmethod
    def open(cls, out_dir: str | Path, fingerprint: dict[str, Any]) -> Manifest:
        """Load ``out_dir/manifest.json`` (or start one); refuse one with another fingerprint.

        A manifest that records no shard yet (a first run failed before committing any) takes the new
        fingerprint, with a warning, so a run with the right detector files can follow a wrong one.

        Raises:
            ManifestMismatchError: the manifest records shards made with another fingerprint.
            ManifestFormatError: the manifest is not a well-formed extraction manifest.
        """
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            return cls(path, {"format": _FORMAT, "version": _VERSION, "fingerprint": fingerprint,
                              "detector": {}, "shards": {}, "totals": {}, "runs": []})
        data = _read(path)
        diffs = _differences(data["fingerprint"], fingerprint)
        if diffs and not data["shards"]:
            log.warning("%s records no shards yet; replacing its fingerprint (%s)", path, "; ".join(diffs))
            data.update(fingerprint=fingerprint, detector={})
        elif diffs:
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

    def set_source_failures(self, totals: dict[str, Any]) -> None:
        """Record img2dataset's failure counts (:func:`source_failure_totals`); saved with the next save."""
        self.data["source_failures"] = totals

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
