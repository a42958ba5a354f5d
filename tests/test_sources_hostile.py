"""Hostile tar shards (issue 14, rows 1-5): unsafe names, links, huge members, bad or huge captions.

Every key of a shard comes back as exactly one sample (success or error), no unsafe name is ever a key, and
a member over the size cap is never read into memory.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from softclip.pipeline.sources import _unsafe_key, open_source


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for field, value in fields.items():
        setattr(info, field, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def _shard(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for member in members:
            _add(tar, *member[:2], **(member[2] if len(member) > 2 else {}))
    return path


def _samples(path, **limits):
    source = open_source(path, **limits)
    return [s for shard in source.shards for s in source.iter_shard(shard)]


def _good(key):
    return [(f"{key}.png", _png()), (f"{key}.txt", b"a red square")]


@pytest.mark.parametrize("name", ["../../evil", "/abs/path", "..", "a/../../b", "dir\\evil", ".hidden", "a//b"])
def test_an_unsafe_member_name_is_an_error_row_never_a_key(tmp_path, name):
    path = _shard(tmp_path / "00000.tar", [*_good("000"), (f"{name}.png", _png()), (f"{name}.txt", b"x"),
                                           *_good("002")])
    samples = _samples(path)
    assert [s.key for s in samples if not s.error] == ["000", "002"]
    (bad,) = [s for s in samples if s.error]
    assert bad.error.startswith("unsafe_member: ") and "00000.tar" in bad.error and repr(f"{name}.png") in bad.error
    assert bad.image is None and bad.caption is None
    assert all(not any(c in s.key for c in ("/", "\\", "\0")) and ".." not in s.key for s in samples if s.error)


@pytest.mark.parametrize("key", ["nul\0byte", "tab\tkey", "del\x7f", "", "/x", "a/../b", "a\\b", "a//b"])
def test_keys_with_control_characters_or_climbing_parts_are_unsafe(key):
    assert _unsafe_key(key) is not None
    assert _unsafe_key("dir/sub/000123") is None


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_link_members_give_an_error_row_and_no_key_is_lost(tmp_path, kind):
    links = [("003.png", b"", {"type": kind, "linkname": "/etc/passwd"}),
             ("003.txt", b"", {"type": kind, "linkname": "000.txt"})]
    path = _shard(tmp_path / "00000.tar", [*_good("000"), *_good("001"), *_good("002"), *links, *_good("004"),
                                           ("005.png", _png()), ("005.txt", b"", {"type": kind, "linkname": "x"})])
    samples = _samples(path)
    assert [s.key for s in samples] == ["000", "001", "002", "003", "004", "005"]
    assert [bool(s.error) for s in samples] == [False, False, False, True, False, True]
    assert samples[3].error.startswith("link_member: ") and "'003.png'" in samples[3].error
    assert samples[5].image is None


def test_every_key_of_a_shard_appears_once_even_when_repeated(tmp_path):
    path = _shard(tmp_path / "00000.tar", [*_good("000"), *_good("001"), *_good("000")])
    samples = _samples(path)
    assert len(samples) == 3 and len({s.key for s in samples}) == 3
    assert samples[2].error.startswith("duplicate_key: ") and "'000'" in samples[2].error


def test_a_key_repeated_right_after_itself_is_a_second_sample_not_a_merge(tmp_path):
    path = _shard(tmp_path / "00000.tar", [*_good("000"), *_good("000"), *_good("001")])
    samples = _samples(path)
    assert [s.key for s in samples][::2] == ["000", "001"] and len(samples) == 3
    assert samples[1].error.startswith("duplicate_key: ") and samples[0].error is None


def test_a_member_over_the_size_cap_is_an_error_row_and_is_not_read(tmp_path):
    path = _shard(tmp_path / "00000.tar", [*_good("000"), ("001.png", b"\0" * 5000), ("001.txt", b"x"),
                                           *_good("002")])
    samples = _samples(path, max_member_bytes=4096)
    assert [bool(s.error) for s in samples] == [False, True, False]
    assert samples[1].error.startswith("member_too_large: ") and "5000 bytes" in samples[1].error
    assert samples[1].image is None
    assert [bool(s.error) for s in _samples(path)] == [False, False, False]  # the default cap is generous


def test_invalid_utf8_caption_is_an_error_row(tmp_path):
    path = _shard(tmp_path / "00000.tar", [("000.png", _png()), ("000.txt", b"caf\xe9 au lait"), *_good("001")])
    samples = _samples(path)
    assert samples[0].error.startswith("bad_caption: ") and "UTF-8" in samples[0].error and "byte 3" in samples[0].error
    assert samples[1].error is None


def test_a_non_text_json_caption_is_an_error_row(tmp_path):
    path = _shard(tmp_path / "00000.tar", [("000.png", _png()), ("000.json", b'{"caption": [1, 2]}')])
    (sample,) = _samples(path)
    assert sample.error.startswith("bad_caption: ") and sample.caption is None


def test_a_caption_over_the_length_cap_is_an_error_row_without_the_caption(tmp_path):
    path = _shard(tmp_path / "00000.tar", [("000.png", _png()), ("000.txt", b"x" * (1 << 20)), *_good("001")])
    samples = _samples(path)
    assert samples[0].error.startswith("caption_too_long: ") and "1048576 characters" in samples[0].error
    assert samples[0].caption is None and samples[1].error is None
    assert _samples(path, max_caption_chars=2 << 20)[0].error is None


def test_limits_must_be_positive(tmp_path):
    path = _shard(tmp_path / "00000.tar", _good("000"))
    with pytest.raises(ValueError, match="max_member_bytes"):
        open_source(path, max_member_bytes=0)
    with pytest.raises(ValueError, match="max_caption_chars"):
        open_source(path, max_caption_chars=0)


_PEAK_SCRIPT = """
import sys
from softclip.pipeline.sources import open_source
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on, not the parent's
    f.write("5")
start_kib = status("VmRSS")
source = open_source(sys.argv[1], max_member_bytes=int(sys.argv[2]))
samples = [s for shard in source.shards for s in source.iter_shard(shard)]
errors = [s.error.partition(":")[0] for s in samples if s.error]
print(len(samples), ",".join(errors), (status("VmHWM") - start_kib) // 1024, status("VmHWM") // 1024)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peak RSS through Linux /proc")
def test_a_gzip_bomb_member_is_refused_in_bounded_memory(tmp_path):
    """A 256 MiB member compressed to ~250 KiB: refused from its header, peak RSS far below its size."""
    size = 256 << 20
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w:gz", format=tarfile.USTAR_FORMAT, compresslevel=9) as tar:  # streamed
        _add(tar, "000.png", _png())
        _add(tar, "000.txt", b"fine")
        info = tarfile.TarInfo("001.png")
        info.size = size
        tar.addfile(info, _Zeros(size))
        _add(tar, "001.txt", b"bomb")
        _add(tar, "002.png", _png())
        _add(tar, "002.txt", b"after")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), str(64 << 20)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    count, errors, growth_mib, peak_mib = int(out[0]), out[1], int(out[2]), int(out[3])
    print(f"gzip bomb: {path.stat().st_size} bytes on disk, {size >> 20} MiB member, peak RSS {peak_mib} MiB "
          f"(+{growth_mib} MiB while reading)")
    assert count == 3 and errors == "member_too_large"
    assert growth_mib < 16, f"RSS grew {growth_mib} MiB while refusing a {size >> 20} MiB member"


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, produced on demand (the bomb is never held in memory while writing it)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = b"\0" * count
        self.left -= count
        return count


def test_extraction_rows_keep_the_source_reason_and_every_key(tmp_path):
    from softclip.extract.job.stages import read_shard_rows

    links = [("003.png", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})]
    path = _shard(tmp_path / "00000.tar", [*_good("000"), ("../x.png", _png()), ("001.png", _png()),
                                           ("001.txt", b"\xff"), *links, ("004.png", b"\0" * 9000)])
    rows = list(read_shard_rows({"spec": str(path), "shard": "00000"}, max_pixels=10**8, require_caption=True,
                                max_member_bytes=8192, max_caption_chars=100))
    reasons = [row["error"].partition(":")[0] for row in rows[:-1]]
    assert reasons == ["", "unsafe_member", "bad_caption", "link_member", "member_too_large"]
    assert rows[-1]["index"] == -1 and rows[-1]["shard_total"] == 5
