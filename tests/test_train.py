"""The training loop and CLI on the shapes world (CPU): resume equals an uninterrupted run, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from softclip.eval.checkpoint import load_open_clip_checkpoint
from softclip.pipeline.annotation_features import write_annotation_shards
from softclip.pipeline.config import apply_overrides, from_dict, load_config, save_config, to_dict
from softclip.pipeline.schedule import cosine_lr
from softclip.train.cli import register
from softclip.train.config import LossConfig, TrainConfig
from softclip.train.loop import param_groups, train
from softclip.train.metrics import MetricLogger

CONFIGS = sorted((Path(__file__).parents[1] / "train" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_root(shapes_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("data_root")
    write_annotation_shards(shapes_world / "train", root / "shapes" / "packed", progress=False)
    return root


def _cfg(data_root, run_dir, name="shapes-softclip", *extra):
    cfg = load_config(TrainConfig, CONFIGS[0].parent / f"{name}.yaml")
    return apply_overrides(cfg, [f"run_dir={run_dir}", f"data.root={data_root}", "data.batch_size=16",
                                 "data.num_workers=0", "data.shuffle_buffer=16", "model.roi_width=32",
                                 "optim.warmup_steps=2", "log.every_n_steps=1", "log.progress=false",
                                 "log.tensorboard=false", *extra])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load_and_round_trip(path):
    cfg = load_config(TrainConfig, path)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    assert (cfg.loss.lam == cfg.loss.mu == 0) == path.stem.endswith("-clip")


def test_cosine_schedule_and_param_groups():
    lrs = [cosine_lr(s, base_lr=1.0, warmup_steps=4, total_steps=14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(0.0244, abs=1e-3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    no_decay, decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(3, 3)] and len(no_decay["params"]) == 3


def test_roi_tokens_get_no_weight_decay():
    from softclip.train.config import ModelConfig
    from softclip.train.model import build_model

    model = build_model(ModelConfig(name="shapes-tiny", roi_feature_dim=72, roi_width=32, roi_heads=4))[0]
    no_decay, decay = param_groups(model, 0.1)
    tokens = {id(model.roi.query), id(model.roi.no_box)}
    assert tokens <= {id(p) for p in no_decay["params"]} and not tokens & {id(p) for p in decay["params"]}
    assert id(model.roi.input_proj.weight) in {id(p) for p in decay["params"]}


@pytest.mark.parametrize("text_target", ["tagset", "ema_text"])  # ema_text: the EMA tower is checkpointed too
def test_resume_continues_exactly(data_root, tmp_path, text_target):
    straight = train(_cfg(data_root, tmp_path / "a", "shapes-softclip", "optim.max_steps=4", f"loss.text_target={text_target}"))
    first = train(_cfg(data_root, tmp_path / "b", "shapes-softclip", "optim.max_steps=4",
                       f"loss.text_target={text_target}", "log.checkpoint_every_n_steps=2", "log.keep_checkpoints=0"))
    assert first.steps == straight.steps == 4
    resumed = train(_cfg(data_root, tmp_path / "b", "shapes-softclip", "optim.max_steps=4", "log.every_n_steps=4",
                         f"loss.text_target={text_target}",
                         "model.grad_checkpointing=true"),  # a runtime setting: free to change on resume
                    resume=str(tmp_path / "b" / "checkpoints" / "step_0000002.pt"))
    assert resumed.steps == 4
    a = torch.load(tmp_path / "a" / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=True)
    assert ("ema_state_dict" in a) == (text_target == "ema_text")
    for key in ("state_dict", "roi_state_dict", "ema_state_dict")[: 2 + ("ema_state_dict" in a)]:
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert a["data_position"] == b["data_position"] and a["step"] == b["step"] == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4]  # the resumed run replaced, not duplicated, step 3 and 4 (now logging every 4)
    straight_losses = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert resumed_losses == pytest.approx([straight_losses[i] for i in (0, 1, 3)], rel=1e-4)
    # first_loss is the call's first step (step 3, not logged), not its first logged step
    assert resumed.first_loss == pytest.approx(straight_losses[2], rel=1e-4)
    assert resumed.last_loss == pytest.approx(straight_losses[3], rel=1e-4)


def test_cli_trains_clip_and_checkpoint_loads(data_root, tmp_path, monkeypatch):
    app = typer.Typer()
    register(app)
    run_dir = tmp_path / "clip"
    cfg_path = tmp_path / "cfg.yaml"
    save_config(_cfg(data_root, run_dir, "shapes-clip"), cfg_path)
    result = CliRunner().invoke(app, ["--config", str(cfg_path), "optim.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert "trained to step 3" in result.output
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert files == ["latest.pt", "latest.pt.sha256", "step_0000003.pt", "step_0000003.pt.sha256"]
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["model_name"] == "shapes-rn" and ckpt["config"]["loss"]["lam"] == 0.0
    assert set(ckpt) >= {"state_dict", "model_config", "roi_state_dict", "optimizer", "step", "rng",
                         "data_position", "config"}
    model = load_open_clip_checkpoint(run_dir / "checkpoints" / "latest.pt").model
    torch.testing.assert_close(model.state_dict()["logit_scale"], ckpt["state_dict"]["logit_scale"])
    resumed = CliRunner().invoke(app, ["--config", str(cfg_path), "optim.max_steps=3", "--resume", "latest"])
    assert resumed.exit_code == 0 and "trained to step 3" in resumed.output
    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks print no summary
    other = CliRunner().invoke(app, ["--config", str(cfg_path), "optim.max_steps=3", "--resume", "latest"])
    assert other.exit_code == 0 and "trained to step" not in other.output
    bad = CliRunner().invoke(app, ["--config", str(cfg_path), "optim.nope=1"])
    assert bad.exit_code != 0 and "optim.nope" in str(bad.exception)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapes-clip", "shapes-softclip"])
def test_shapes_configs_train_with_falling_loss(data_root, tmp_path, name):
    summary = train(_cfg(data_root, tmp_path / name, name, "data.batch_size=32", "optim.epochs=8",
                         "log.every_n_steps=4"))
    assert summary.steps == 32 and summary.last_loss < 0.85 * summary.first_loss  # 8 epochs of ceil(120 / 32)


def _ddp_train(rank, world_size, port, cfg):
    import os

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(cfg)
    assert not torch.distributed.is_initialized()  # train() destroys the process group it started


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapes-softclip", "shapes-clip"])  # CLIP: the unused ROI branch stays out of DDP
def test_two_process_gloo_training_writes_one_checkpoint(data_root, tmp_path, name):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(data_root, tmp_path / "ddp", name, "optim.max_steps=3")
    mp.spawn(_ddp_train, args=(2, port, cfg), nprocs=2, join=True)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["data_position"]) == 2 and len(ckpt["rng"]) == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    with pytest.raises(ValueError, match="saved by 2 ranks, this run has 1"):  # the data position is per rank
        train(cfg, resume="latest")


def test_a_non_finite_loss_stops_training_with_advice():
    from softclip.train.metrics import log_line_metrics

    timing = {"elapsed": 1.0, "steps": 1, "data_wait": 0.0, "nonfinite": torch.tensor(1.0)}
    with pytest.raises(FloatingPointError, match="diverged; lower optim.lr"):
        log_line_metrics({"loss": torch.tensor(float("nan"))}, 1e-3, timing, {}, 16, False)
    skipped = log_line_metrics({"loss": torch.tensor(float("nan"))}, 1e-3, timing, {}, 16, True)
    assert skipped["nonfinite_steps"] == 1.0
    timing["nonfinite"] = torch.tensor(0.0)
    assert log_line_metrics({"loss": torch.tensor(2.0)}, 1e-3, timing, {}, 16, False)["samples_per_s"] == 16.0


def test_beta_zero_is_refused_unless_clip():
    with pytest.raises(ValueError, match="loss.beta=0.*loss.lam=0 loss.mu=0"):
        LossConfig(beta=0.0, lam=0.0, mu=0.5)
    with pytest.raises(ValueError, match="loss.beta=0"):
        LossConfig(beta=0.0, lam=1.0, mu=0.0)
    assert LossConfig(beta=0.0, lam=0.0, mu=0.0).beta == 0.0  # CLIP ignores beta


def test_loss_config_validates_the_teacher_switches():
    with pytest.raises(ValueError, match="image_target=none and loss.text_target=none"):
        LossConfig(image_target="none", text_target="none")
    assert LossConfig(image_target="none", text_target="none", lam=0.0, mu=0.0).roi_weight == 1.0  # control
    for bad in ({"tau_text": 0.0}, {"roi_weight": -1.0}, {"ema_decay": 1.0}):
        with pytest.raises(ValueError, match="loss."):
            LossConfig(**bad)
    default = LossConfig()
    assert default.detach_targets and default.ramp and (default.image_target, default.text_target) == ("roi", "tagset")


def test_soft_ramp_grows_over_the_warm_up():
    from softclip.train.config import DataConfig, ModelConfig, OptimConfig
    from softclip.train.loop import soft_ramp

    cfg = TrainConfig(run_dir=Path("x"), model=ModelConfig(name="x"), data=DataConfig(train_shards="x"),
                      optim=OptimConfig(warmup_steps=4))
    assert [soft_ramp(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    off = TrainConfig(run_dir=Path("x"), model=ModelConfig(name="x"), data=DataConfig(train_shards="x"),
                      optim=OptimConfig(warmup_steps=4), loss=LossConfig(ramp=False))
    assert soft_ramp(0, off) == 1.0


def test_metrics_resume_drops_a_half_written_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    MetricLogger(tmp_path, resume_step=2, tensorboard=False).log(3, {"loss": 1.8})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.8}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 "):
        MetricLogger(tmp_path, resume_step=3, tensorboard=False)
    assert "lo\n" in path.read_text()  # left as it was


def test_run_dir_guards_and_bad_resume_files(data_root, tmp_path):
    run_dir = tmp_path / "run"
    train(_cfg(data_root, run_dir, "shapes-softclip", "optim.max_steps=2"))
    latest = run_dir / "checkpoints" / "latest.pt"
    with pytest.raises(FileExistsError, match="--resume latest.*new run_dir"):  # a fresh start would mix runs
        train(_cfg(data_root, run_dir, "shapes-softclip", "optim.max_steps=2"))
    ckpt = torch.load(latest, weights_only=True)
    weights_only = tmp_path / "open_clip.pt"
    torch.save(ckpt["state_dict"], weights_only)
    with pytest.raises(ValueError, match=f"{weights_only}: not a training checkpoint"):
        train(_cfg(data_root, run_dir, "shapes-softclip", "optim.max_steps=2"), resume=str(weights_only))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{truncated}: cannot read the checkpoint"):
        train(_cfg(data_root, run_dir, "shapes-softclip", "optim.max_steps=2"), resume=str(truncated))
    with pytest.raises(ValueError, match=r"model differs.*roi_width: 32 -> 64"):
        train(_cfg(data_root, run_dir, "shapes-softclip", "optim.max_steps=2", "model.roi_width=64"),
              resume="latest")
    resumed = train(_cfg(data_root, run_dir, "shapes-softclip", "optim.max_steps=3", "optim.weight_decay=0.05",
                         "optim.eps=1e-8", "optim.betas=[0.8,0.9]"), resume="latest")
    assert resumed.steps == 3
    groups = torch.load(latest, weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]  # the run's overrides, not the saved values
    assert all(g["eps"] == 1e-8 and tuple(g["betas"]) == (0.8, 0.9) for g in groups)


def _tiny_step_setup(**loss):
    from softclip.train.config import ModelConfig
    from softclip.train.data import tagset_ids
    from softclip.train.losses import SoftCLIPLoss
    from softclip.train.model import build_model

    torch.manual_seed(0)
    model, _, _, tokenizer = build_model(ModelConfig(name="shapes-tiny", roi_feature_dim=8, roi_width=16,
                                                     roi_heads=4), ema_text=loss.get("text_target") == "ema_text")
    loss_fn = SoftCLIPLoss(**loss)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, fused=True)
    tags = ["red circle, blue star", "green square", "red star", "blue circle"]
    ids = [tagset_ids(t) for t in tags]
    batch = {"images": torch.randn(4, 3, 64, 64), "texts": tokenizer(["a red circle"] * 2 + ["a star"] * 2),
             "tags": tokenizer(tags), "roi_features": torch.randn(4, 3, 8).half(), "roi_geometry": torch.rand(4, 3, 6),
             "roi_mask": torch.ones(4, 3, dtype=torch.bool),
             "tagset": torch.tensor([row + [-1] * (6 - len(row)) for row in ids])}
    return model, loss_fn, optimizer, batch


def test_a_non_finite_batch_never_reaches_the_weights():
    from softclip.train.loop import train_step

    model, loss_fn, optimizer, batch = _tiny_step_setup()
    from softclip.train.config import DataConfig, ModelConfig

    config = TrainConfig(run_dir=Path("unused"), model=ModelConfig(name="shapes-tiny"),
                         data=DataConfig(train_shards="unused"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = batch | {"images": torch.full_like(batch["images"], float("nan"))}
    out = train_step(model, loss_fn, optimizer, bad, config, torch.device("cpu"))
    assert float(out["nonfinite"]) == 1.0 and not torch.isfinite(out["loss"])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # the update was skipped on the device
    out = train_step(model, loss_fn, optimizer, batch, config, torch.device("cpu"))
    assert float(out["nonfinite"]) == 0.0 and torch.isfinite(out["loss"])
    assert not torch.equal(model.roi.query, before["roi.query"])  # training goes on from the same weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_threads_leave_a_core_per_loader_worker(monkeypatch):
    import os

    from softclip.train.config import DataConfig, ModelConfig
    from softclip.train.data import _one_thread
    from softclip.train.runtime import set_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    try:
        for workers, threads, expected in ((1, 0, 5), (2, 0, 4), (8, 0, 1), (1, 3, 3)):
            set_threads(TrainConfig(run_dir=Path("x"), model=ModelConfig(name="x"),
                                     data=DataConfig(train_shards="x", num_workers=workers, threads=threads)))
            assert torch.get_num_threads() == expected
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on the node share the 6 cores
        set_threads(TrainConfig(run_dir=Path("x"), model=ModelConfig(name="x"),
                                 data=DataConfig(train_shards="x", num_workers=1)))
        assert torch.get_num_threads() == 2
        _one_thread(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
