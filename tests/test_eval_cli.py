"""Option merging of `softclip eval` (config file < options < --set overrides)."""

from pathlib import Path

import pytest

from softclip.eval.cli import build_config
from softclip.pipeline.config import ConfigError


def _build(**kwargs):
    base = dict(checkpoints=[], tasks=None, out=None, data_root=None, batch_size=None, config=None, overrides=[])
    return build_config(**{**base, **kwargs})


def test_labels_from_label_equals_path_and_plain_paths():
    cfg = _build(checkpoints=["CLIP=runs/clip/last.pt", "SoftCLIP=runs/soft/last.pt"], out=Path("r"))
    assert cfg.labels == ("CLIP", "SoftCLIP")
    assert cfg.checkpoints == (Path("runs/clip/last.pt"), Path("runs/soft/last.pt"))
    plain = _build(checkpoints=["runs/a=b/last.pt"], out=Path("r"))
    assert plain.labels == () and plain.checkpoints == (Path("runs/a=b/last.pt"),)
    with pytest.raises(ValueError, match="for every checkpoint or for none"):
        _build(checkpoints=["A=x.pt", "y.pt"], out=Path("r"))


def test_config_file_options_and_overrides(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("checkpoints: [a.pt]\nout: from_file\ntasks: [coco]\nbatch_size: 8\n")
    cfg = _build(config=config, tasks="imagenet,shapes", batch_size=16, model="RN50",
                 overrides=["num_workers=0", "paths={coco: /data/coco}"])
    assert cfg.out == Path("from_file") and cfg.tasks == ("imagenet", "shapes")
    assert cfg.batch_size == 16 and cfg.num_workers == 0 and cfg.model_name == "RN50"
    assert cfg.paths == {"coco": Path("/data/coco")}
    with pytest.raises(ConfigError, match="'out' is required"):
        _build(checkpoints=["a.pt"])
    config.write_text("checkpoints: [a.pt]\nout: r\nbatchsize: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'batchsize'"):
        _build(config=config)


def test_bad_config_file_is_named(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("checkpoints: [a.pt\n")
    with pytest.raises(ConfigError, match=r"eval.yaml: not valid YAML"):
        _build(config=config)
    config.write_text("- a.pt\n")
    with pytest.raises(ConfigError, match=r"eval.yaml: expected a mapping"):
        _build(config=config)
    with pytest.raises(FileNotFoundError, match=r"missing.yaml"):
        _build(config=tmp_path / "missing.yaml")
