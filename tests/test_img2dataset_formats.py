"""img2dataset's three output formats, as the real img2dataset 1.47.0 wrote them (tests/fixtures/img2dataset,
6-digit keys, one failed download and one undecodable file): each is read, every successful key once, and the
failures come from its side files (issue 12, gaps 4 and 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from softclip.pipeline.images import decode_image
from softclip.pipeline.img2dataset import img2dataset_stats
from softclip.pipeline.sources import open_source

FIXTURES = Path(__file__).parent / "fixtures" / "img2dataset"
SUCCESS_KEYS = {"000000", "000001", "000002", "000003", "000010", "000011", "000012", "000013"}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_every_format_reads_each_successful_key_once(fmt):
    source = open_source(FIXTURES / fmt)
    assert source.kind == fmt
    samples = [s for shard in source.shards for s in source.iter_shard(shard)]
    assert sorted(s.key for s in samples) == sorted(SUCCESS_KEYS)
    assert all(s.error is None for s in samples)
    by_key = {s.key: s for s in samples}
    assert by_key["000012"].caption == "caption 6"  # row order inside a shard follows download order
    assert decode_image(by_key["000000"].image).size == (16, 16)
    assert by_key["000000"].meta["status"] == "success"


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_failures_come_from_the_side_files(fmt):
    stats = img2dataset_stats(open_source(FIXTURES / fmt))
    assert sorted(stats) == ["00000", "00001", "00002"]
    assert sum(s["count"] for s in stats.values()) == 10
    assert sum(s["successes"] for s in stats.values()) == len(SUCCESS_KEYS)
    assert stats["00002"]["failed_to_download"] == 1 and stats["00002"]["failed_to_resize"] == 1
    assert stats["00002"]["status_dict"] == {"HTTP Error 404: File not found": 1, "Image decoding error": 1}


def test_a_brace_pattern_counts_only_its_own_shards():
    stats = img2dataset_stats(open_source(str(FIXTURES / "webdataset" / "{00000..00001}.tar")))
    assert sorted(stats) == ["00000", "00001"]
