"""SoftCLIP loss: equality with open_clip's ClipLoss, hand-computed terms, gradients, DDP gathering."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from softclip.train.losses import (
    VIEW_SOURCES,
    SoftCLIPLoss,
    calibrate_tau,
    contrastive_loss,
    disentangled_negatives,
    label_smoothing_targets,
    mean_off_diagonal_cosine,
    mean_roi_features,
    negative_loss,
    negatives_entropy,
    self_similarity,
    soft_loss,
    softened_targets,
    symmetric_kl,
    tagset_similarity,
    tagset_vectors,
)


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _np_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _np_skl(a, b):
    """KL(a||b) + KL(b||a) per row, row mean; entries where both are 0 (the removed positive) add nothing."""
    both = (a > 0) & (b > 0)
    terms = np.where(both, (a - b) * (np.log(np.where(both, a, 1.0)) - np.log(np.where(both, b, 1.0))), 0.0)
    return float(np.mean(terms.sum(axis=1)))


def _np_negatives(p):
    q = p.copy()
    np.fill_diagonal(q, 0.0)
    return q / q.sum(axis=1, keepdims=True)


def test_clip_baseline_equals_open_clip_clip_loss():
    image, text, scale = _unit(8, 16, seed=1), _unit(8, 16, seed=2), torch.tensor(14.3)
    ours = SoftCLIPLoss(lam=0.0, mu=0.0, roi_weight=0.0)(image, text, scale)
    reference = ClipLoss()(image, text, scale)
    torch.testing.assert_close(ours["loss"], reference)
    assert float(ours["loss_soft"]) == 0.0 and float(ours["loss_neg"]) == 0.0 and float(ours["loss_roi"]) == 0.0
    assert not any(k.startswith(("neg_entropy", "cos_")) for k in ours)


def test_symmetric_kl_by_hand():
    a, b = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expected = (0.5 - 0.9) * math.log(0.5 / 0.9) + (0.5 - 0.1) * math.log(0.5 / 0.1)  # 0.8789
    assert float(symmetric_kl(a.log(), b.log())) == pytest.approx(expected, rel=1e-6)


def test_softened_targets_by_hand():
    # S = [[0.8, 0.2], [0.4, 0.6]], beta = 0.3 -> Y = 0.7 I + 0.3 S
    s = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    y = softened_targets(s.log(), 0.3).exp()
    torch.testing.assert_close(y, torch.tensor([[0.94, 0.06], [0.12, 0.88]]))
    # negatives of a 3x3 target: drop the diagonal, renormalise
    t = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.25, 0.25, 0.5]])
    neg = disentangled_negatives(t.log()).exp()
    torch.testing.assert_close(neg, torch.tensor([[0.0, 2 / 3, 1 / 3], [0.75, 0.0, 0.25], [0.5, 0.5, 0.0]]))


def test_soft_and_negative_terms_match_independent_numpy():
    n, beta, tau_image, tau_text, scale = 5, 0.3, 0.07, 0.2, 10.0
    v, t, r, g = (_unit(n, 8, seed=s) for s in (3, 4, 5, 6))
    out = SoftCLIPLoss(beta=beta, tau_image=tau_image, tau_text=tau_text, lam=1.0, mu=0.5, image_target="roi",
                       text_target="text", roi_weight=0.6)(v, t, torch.tensor(scale), {"roi": r, "text": g})
    vn, tn, rn, gn = (x.double().numpy() for x in (v, t, r, g))
    p_i2t = np.exp(_np_log_softmax(scale * vn @ tn.T))
    p_t2i = np.exp(_np_log_softmax(scale * tn @ vn.T))
    y_i2t = (1 - beta) * np.eye(n) + beta * np.exp(_np_log_softmax(rn @ rn.T / tau_image))
    y_t2i = (1 - beta) * np.eye(n) + beta * np.exp(_np_log_softmax(gn @ gn.T / tau_text))
    roi = -(np.mean(np.log(np.diag(np.exp(_np_log_softmax(scale * rn @ tn.T)))))
            + np.mean(np.log(np.diag(np.exp(_np_log_softmax(scale * tn @ rn.T)))))) / 2
    nce = -(np.mean(np.log(np.diag(p_i2t))) + np.mean(np.log(np.diag(p_t2i)))) / 2
    soft = (_np_skl(y_i2t, p_i2t) + _np_skl(y_t2i, p_t2i)) / 2
    neg = (_np_skl(_np_negatives(y_i2t), _np_negatives(p_i2t))
           + _np_skl(_np_negatives(y_t2i), _np_negatives(p_t2i))) / 2
    assert float(out["loss_nce"]) == pytest.approx(nce, rel=1e-4)
    assert float(out["loss_soft"]) == pytest.approx(soft, rel=1e-4)
    assert float(out["loss_neg"]) == pytest.approx(neg, rel=1e-4)
    assert float(out["loss_roi"]) == pytest.approx(roi, rel=1e-4)
    assert float(out["loss"]) == pytest.approx(nce + 0.6 * roi + soft + 0.5 * neg, rel=1e-4)
    for direction, y in (("i2t", y_i2t), ("t2i", y_t2i)):
        negatives = _np_negatives(y)
        entropy = -np.mean(np.sum(np.where(negatives > 0, negatives * np.log(np.where(negatives > 0, negatives, 1)),
                                           0), 1))
        assert float(out[f"neg_entropy_{direction}"]) == pytest.approx(entropy, rel=1e-4)
    for name, x in (("cos_r", rn), ("cos_g", gn)):
        gram = x @ x.T
        assert float(out[name]) == pytest.approx((gram.sum() - np.trace(gram)) / (n * (n - 1)), rel=1e-4, abs=1e-6)


def test_negative_term_ignores_the_positive_logit():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(7))
    targets = softened_targets(self_similarity(_unit(6, 4, seed=8), 0.07), 0.3)
    base = negative_loss(targets, targets, logits, logits.T)
    bumped = logits + torch.diag(torch.linspace(-5, 5, 6))
    torch.testing.assert_close(negative_loss(targets, targets, bumped, bumped.T), base)
    assert not torch.allclose(soft_loss(targets, targets, bumped, bumped.T), soft_loss(targets, targets, logits, logits.T))


@pytest.mark.parametrize("detach", [False, True])
def test_gradients_reach_roi_and_tags_unless_detached(detach):
    v, t = _unit(6, 8, seed=1).requires_grad_(), _unit(6, 8, seed=2).requires_grad_()
    r, g = _unit(6, 8, seed=3).requires_grad_(), _unit(6, 8, seed=4).requires_grad_()
    loss = SoftCLIPLoss(image_target="roi", text_target="text", roi_weight=0.0, detach_targets=detach)
    loss(v, t, torch.tensor(10.0), {"roi": r, "text": g})["loss"].backward()
    assert v.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
    for x in (r, g):
        assert (x.grad is None) == detach
        if not detach:
            assert x.grad.abs().sum() > 0


def test_roi_infonce_trains_the_detached_teacher_and_only_it_reaches_r():
    v, t, r = (_unit(6, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    out = SoftCLIPLoss(image_target="roi", text_target="none", roi_weight=0.7)(v, t, torch.tensor(10.0), {"roi": r})
    roi_logits = 10.0 * r @ t.T
    torch.testing.assert_close(out["loss_roi"], contrastive_loss(roi_logits, roi_logits.T))
    torch.testing.assert_close(out["loss"], out["loss_nce"] + 0.7 * out["loss_roi"] + out["loss_soft"]
                               + 0.5 * out["loss_neg"])
    soft_grad = torch.autograd.grad(out["loss_soft"] + out["loss_neg"], r, retain_graph=True, allow_unused=True)[0]
    assert soft_grad is None  # the soft terms see r only as a detached teacher
    assert torch.autograd.grad(out["loss"], r)[0].abs().sum() > 0  # L_roi trains it


SOURCES = ["roi", "roi_mean", "text", "ema_text", "tagset", "student", "uniform", "none"]


@pytest.mark.parametrize("image_source", SOURCES)
@pytest.mark.parametrize("text_source", ["tagset", "student", "none"])
def test_target_sources(image_source, text_source):
    if image_source == text_source == "none":
        with pytest.raises(ValueError, match="none"):
            SoftCLIPLoss(image_target="none", text_target="none")
        return
    v, t = _unit(5, 8, seed=1).requires_grad_(), _unit(5, 8, seed=2).requires_grad_()
    loss = SoftCLIPLoss(image_target=image_source, text_target=text_source, roi_weight=0.0)
    views = {name: _unit(5, 8, seed=3 + i) for i, name in enumerate(VIEW_SOURCES)}
    assert loss.views == {image_source, text_source} & set(VIEW_SOURCES)
    out = loss(v, t, torch.tensor(10.0), {k: views[k] for k in loss.views})
    assert torch.isfinite(out["loss"]) and float(out["loss_soft"].detach()) > 0
    assert ("neg_entropy_i2t" in out) == (image_source != "none")
    assert ("neg_entropy_t2i" in out) == (text_source != "none")
    out["loss"].backward()
    with pytest.raises(ValueError, match="view"):
        SoftCLIPLoss(image_target="roi")(v, t, torch.tensor(10.0), {})


def test_label_smoothing_is_the_uniform_source():
    y = label_smoothing_targets(5, 0.3).exp()
    torch.testing.assert_close(y.sum(1), torch.ones(5))
    assert float(y[0, 1]) == pytest.approx(0.3 / 4)
    out = SoftCLIPLoss(image_target="uniform", text_target="uniform", roi_weight=0.0)(
        _unit(5, 8, seed=1), _unit(5, 8, seed=2), torch.tensor(10.0))
    assert float(out["neg_entropy_i2t"]) == pytest.approx(math.log(4), abs=1e-5)  # uniform = ln(N - 1)


def test_monitors_and_tau_calibration():
    same = F.normalize(torch.ones(4, 3), dim=1)
    assert float(mean_off_diagonal_cosine(same)) == pytest.approx(1.0)
    assert float(mean_off_diagonal_cosine(torch.eye(4))) == pytest.approx(0.0)
    x = _unit(64, 16, seed=5)
    for target in (1.5, 3.0):
        tau = calibrate_tau(x, target)
        assert float(negatives_entropy(self_similarity(x, tau))) == pytest.approx(target, abs=1e-3)
    assert calibrate_tau(x, 1.5) < calibrate_tau(x, 3.0)
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    torch.testing.assert_close(mean_roi_features(features, torch.tensor([[True, True, False]])),
                               torch.tensor([[0.5**0.5, 0.5**0.5]]))


def test_soft_scale_multiplies_only_the_soft_terms():
    args = (_unit(6, 8, seed=1), _unit(6, 8, seed=2), torch.tensor(10.0), {"roi": _unit(6, 8, seed=3)})
    loss = SoftCLIPLoss(image_target="roi", text_target="student")
    full, half = loss(*args), loss(*args, soft_scale=0.5)
    torch.testing.assert_close(full["loss"] - half["loss"], 0.5 * (full["loss_soft"] + 0.5 * full["loss_neg"]))


def test_tagset_similarity_is_the_cosine_of_multi_hot_sets():
    from softclip.train.data import tagset_ids

    tags = ["red circle, blue star", "red circle", "green square", ""]
    width = max(len(tagset_ids(t)) for t in tags)
    ids = torch.tensor([tagset_ids(t) + [-1] * (width - len(tagset_ids(t))) for t in tags])
    h = tagset_vectors(ids)
    sets = [set(tagset_ids(t)) for t in tags]
    cos = torch.tensor([[len(a & b) / math.sqrt(len(a) * len(b)) if a and b else 0.0 for b in sets] for a in sets])
    torch.testing.assert_close(h @ h.T, cos)  # no bucket collision among these few features
    assert math.isclose(float(cos[0, 1]), 3 / math.sqrt(6 * 3), rel_tol=1e-6)  # "red circle", red, circle
    torch.testing.assert_close(tagset_similarity(ids, 0.5), torch.log_softmax(cos / 0.5, dim=1))


def test_single_pair_batch_is_finite():
    out = SoftCLIPLoss(image_target="roi", text_target="text")(_unit(1, 4), _unit(1, 4, seed=1), torch.tensor(10.0),
                                                                {"roi": _unit(1, 4), "text": _unit(1, 4)})
    assert all(torch.isfinite(v) for v in out.values())


def test_beta_zero_is_refused_for_the_soft_terms():
    image, text, scale = _unit(4, 8, seed=1), _unit(4, 8, seed=2), torch.tensor(10.0)
    for lam, mu in ((1.0, 0.0), (0.0, 0.5)):
        with pytest.raises(ValueError, match="beta=0.0.*one-hot.*lam=mu=0 for CLIP"):
            SoftCLIPLoss(beta=0.0, lam=lam, mu=mu, image_target="student")
    clip = SoftCLIPLoss(beta=0.0, lam=0.0, mu=0.0, roi_weight=0.0)(image, text, scale)
    torch.testing.assert_close(clip["loss"], ClipLoss()(image, text, scale))


def test_unknown_target_source_is_refused():
    with pytest.raises(ValueError, match="image_target 'nope'"):
        SoftCLIPLoss(image_target="nope")


# --- DDP: two gloo processes on CPU give the single-process loss and gradients -------------------------

class _Heads(torch.nn.Module):
    """Four linear "towers" producing normalised image, text, ROI and tag embeddings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(12, 8) for k in ("image", "text", "roi", "tag")})

    def forward(self, inputs):
        return {k: F.normalize(self.heads[k](inputs[k]), dim=-1) for k in self.heads}


def _inputs(n=8):
    gen = torch.Generator().manual_seed(42)
    return {k: torch.randn(n, 12, generator=gen) for k in ("image", "text", "roi", "tag")}


def _loss_and_grads(model, module, inputs, world_size):
    out = model(inputs)
    loss = SoftCLIPLoss(image_target="roi", text_target="text", detach_targets=False, world_size=world_size)(
        out["image"], out["text"], torch.tensor(10.0), {"roi": out["roi"], "text": out["tag"]})
    loss["loss"].backward()
    return {"loss": loss["loss"].detach(), "grads": {n: p.grad.clone() for n, p in module.named_parameters()}}


def _ddp_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    module = _Heads()
    model = torch.nn.parallel.DistributedDataParallel(module)
    local = {k: v.chunk(world_size)[rank] for k, v in _inputs().items()}
    torch.save(_loss_and_grads(model, module, local, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    module = _Heads()
    expected = _loss_and_grads(module, module, _inputs(), 1)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], expected["loss"])
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6)
