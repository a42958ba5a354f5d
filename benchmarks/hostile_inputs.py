"""Hostile inputs: a seeded campaign of damaged tar shards through the extraction's read stage, and of damaged
training checkpoints through ``load_checkpoint``.

Prints one JSON object. Shards: every sample gets one random fault (unsafe member name, symbolic or hard
link, member over the size cap, non-UTF-8 or over-long caption, non-object json, non-text json caption, a
repeated key, undecodable image bytes, an empty member) or none; the read stage
(:func:`softclip.extract.job.stages.read_shard_rows`) must yield exactly one row per sample written (``keys
lost`` and ``duplicates`` count the difference), never raise (``crashes``), and never use an unsafe name
as a key. Checkpoints: truncations, single bit flips and random files of a real checkpoint, each must be
one ``CorruptCheckpointError`` naming the file.

    PYTHONPATH=. python benchmarks/hostile_inputs.py [--shards 40] [--samples 25] [--checkpoints 300]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from softclip.extract.job.stages import read_shard_rows
from softclip.train.checkpoint import CorruptCheckpointError, load_checkpoint, save_checkpoint

FAULTS = ("none", "unsafe_name", "symlink", "hardlink", "too_large", "bad_utf8", "long_caption", "json_list",
          "json_caption_list", "repeated_key", "garbage_image", "empty_member")
_CAP_BYTES, _CAP_CHARS = 4096, 200
_UNSAFE = ("../../evil", "/abs/path", "a/../../b", "dir\\evil", ".hidden", "a//b")


def _png(rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8 + rng.randrange(8), 8), (rng.randrange(256), 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for field, value in fields.items():
        setattr(info, field, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def _write_sample(tar: tarfile.TarFile, key: str, fault: str, rng: random.Random, written: list[str]) -> str:
    """Write one sample with ``fault``; returns the key a reader sees first (the repeated one for repeats)."""
    if fault == "unsafe_name":
        key = rng.choice(_UNSAFE)
    if fault == "repeated_key" and written:
        key = rng.choice(written)
    image, caption = _png(rng), b"a red square"
    meta = {"caption": caption.decode()}
    image = {"too_large": b"\0" * (_CAP_BYTES + 1), "garbage_image": rng.randbytes(64), "empty_member": b""}.get(
        fault, image)
    caption = {"bad_utf8": b"caf\xe9", "long_caption": b"x" * (_CAP_CHARS + 1)}.get(fault, caption)
    link = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}.get(fault)
    if link is not None:
        _add(tar, f"{key}.png", type=link, linkname="/etc/passwd")
    else:
        _add(tar, f"{key}.png", image)
    _add(tar, f"{key}.txt", caption)
    meta_bytes = {"json_list": b"[1]", "json_caption_list": b'{"caption": [1]}'}.get(fault, json.dumps(meta).encode())
    _add(tar, f"{key}.json", meta_bytes)
    return key


def shard_campaign(folder: Path, shards: int, samples: int, rng: random.Random) -> dict:
    tried, crashes, lost, duplicates, unsafe_keys = Counter(), 0, 0, 0, 0
    reasons: Counter = Counter()
    for index in range(shards):
        path = folder / f"{index:05d}.tar"
        written: list[str] = []
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(samples):
                fault = rng.choice(FAULTS)
                tried[fault] += 1
                written.append(_write_sample(tar, f"{index:05d}{i:04d}", fault, rng, written))
        try:
            rows = list(read_shard_rows({"spec": str(path), "shard": path.stem}, max_pixels=10**8,
                                        require_caption=True, max_member_bytes=_CAP_BYTES,
                                        max_caption_chars=_CAP_CHARS))
        except Exception:  # noqa: BLE001 - counted: the campaign measures crashes
            crashes += 1
            continue
        keys = [row["key"] for row in rows if row["index"] >= 0]
        lost += max(len(written) - len(keys), 0)
        duplicates += len(keys) - len(set(keys))
        unsafe_keys += sum(any(bad in key for bad in ("..", "\\")) or key.startswith("/") for key in keys)
        reasons.update(row["error"].partition(":")[0] or "success" for row in rows if row["index"] >= 0)
    return {"samples_tried": sum(tried.values()), "faults": dict(sorted(tried.items())), "shards": shards,
            "crashes": crashes, "keys_lost": lost, "duplicates": duplicates, "unsafe_keys": unsafe_keys,
            "row_reasons": dict(sorted(reasons.items()))}


def checkpoint_campaign(folder: Path, count: int, rng: random.Random) -> dict:
    save_checkpoint(folder, 1, {"step": 1, "weight": torch.randn(4096), "config": {"name": "x"}})
    good = (folder / "checkpoints" / "step_0000001.pt").read_bytes()
    target = folder / "fuzz" / "latest.pt"
    target.parent.mkdir()
    (target.parent / "latest.pt.sha256").write_text(
        (folder / "checkpoints" / "latest.pt.sha256").read_text())
    outcome: Counter = Counter()
    for i in range(count):
        kind = ("truncated", "bit_flip", "random")[i % 3]
        data = bytearray(good)
        if kind == "truncated":
            data = data[: rng.randrange(len(data))]
        elif kind == "bit_flip":
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        else:
            data = rng.randbytes(rng.choice([0, 7, 1024, 65536]))
        target.write_bytes(bytes(data))
        try:
            load_checkpoint(target)
            outcome["loaded"] += 1
        except CorruptCheckpointError as err:
            outcome["refused_naming_file" if str(target) in str(err) else "refused_unnamed"] += 1
        except Exception:  # noqa: BLE001 - counted: the campaign measures crashes
            outcome["crashes"] += 1
    return {"checkpoints_tried": count, **dict(sorted(outcome.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--checkpoints", type=int, default=300)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "shards").mkdir()
        result = {"shards": shard_campaign(Path(tmp) / "shards", args.shards, args.samples, rng),
                  "checkpoints": checkpoint_campaign(Path(tmp), args.checkpoints, rng)}
    print(json.dumps({**result, "seed": args.seed, "seconds": round(time.perf_counter() - start, 1)}, indent=2))


if __name__ == "__main__":
    main()
