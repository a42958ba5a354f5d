"""One precision vocabulary (pipeline.precision) for the detector, training and evaluation configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from softclip.eval.evaluate import EvalConfig
from softclip.extract.detector.config import DetectorSettings
from softclip.pipeline.config import ConfigError, from_dict
from softclip.pipeline.precision import PRECISIONS, autocast, effective_precision
from softclip.train.config import OptimConfig


def test_the_vocabulary_is_one_tuple():
    assert PRECISIONS == ("fp32", "bf16", "fp16")


def test_training_and_evaluation_accept_its_words_and_only_them(tmp_path):
    eval_cfg = EvalConfig(checkpoints=(Path("a.pt"),), out=tmp_path)
    assert eval_cfg.precision == "bf16" and not hasattr(eval_cfg, "amp")
    for word in PRECISIONS:
        assert dataclasses.replace(eval_cfg, precision=word).precision == word
    for word in ("fp32", "bf16"):
        assert OptimConfig(precision=word).precision == word
    with pytest.raises(ValueError, match="optim.precision=fp16 needs loss scaling"):
        OptimConfig(precision="fp16")
    with pytest.raises(ConfigError, match="'precision' = 'half'"):
        from_dict(OptimConfig, {"precision": "half"})
    with pytest.raises(ConfigError, match="'precision' = 'amp'"):
        from_dict(EvalConfig, {"checkpoints": ["a.pt"], "out": str(tmp_path), "precision": "amp"})


def test_the_detector_speaks_the_same_words():
    assert DetectorSettings().precision == "fp32" and not hasattr(DetectorSettings(), "amp")
    for word in PRECISIONS:
        assert from_dict(DetectorSettings, {"precision": word}).precision == word
    with pytest.raises(ConfigError, match="'precision' = 'none'"):  # the detector's old word for fp32
        from_dict(DetectorSettings, {"precision": "none"})


def test_a_cpu_always_runs_fp32():
    x = torch.ones(4, 4)
    for word in PRECISIONS:
        assert effective_precision(torch.device("cpu"), word) == "fp32"
        with autocast(torch.device("cpu"), word):
            assert (x @ x).dtype == torch.float32
    assert effective_precision(torch.device("cuda"), "bf16") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'half'"):
        effective_precision(torch.device("cuda"), "half")
