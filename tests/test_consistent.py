"""Many-to-many evaluation of the shapes world: which images a caption fits, and the metrics crediting them."""

import itertools
import json

import numpy as np
import pytest
import torch

from softclip.eval.consistent import (
    average_precision,
    consistency_matrix,
    consistent_indices,
    consistent_retrieval_metrics,
)
from softclip.eval.datasets import load_retrieval_set
from softclip.eval.retrieval import retrieval_metrics
from softclip.pipeline.shapes import ShapesConfig, generate, sample_objects
from softclip.pipeline.shapes_captions import (
    CaptionContent,
    Mention,
    caption_with_content,
    consistent_images,
    fits,
)


def _brute_force(images, texts, consistent, k):
    """Loops over Python floats: R@k (ties against the query) and AP (ties: inconsistent items first)."""
    scores = (torch.nn.functional.normalize(texts.double(), dim=-1)
              @ torch.nn.functional.normalize(images.double(), dim=-1).T).tolist()
    out = {}
    for name, rows, positive in (("text_to_image", scores, consistent.tolist()),
                                 ("image_to_text", [list(c) for c in zip(*scores)], consistent.T.tolist())):
        hits, aps = 0, []
        for row, pos in zip(rows, positive):
            best = max(s for s, p in zip(row, pos) if p)
            hits += sum(1 for s, p in zip(row, pos) if not p and s >= best) < k
            ranked = sorted(zip(row, pos), key=lambda item: (-item[0], item[1]))
            found, precisions = 0, []
            for rank, (_, p) in enumerate(ranked, start=1):
                if p:
                    found += 1
                    precisions.append(found / rank)
            aps.append(sum(precisions) / len(precisions))
        out[f"consistent_{name}_R@{k}"] = hits / len(rows)
        out[f"consistent_{name}_mAP"] = sum(aps) / len(aps)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_a_brute_force_computation_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    # entries +-1 in 4 dimensions: unit vectors of +-0.5, exact cosines in float32, many ties
    images = torch.randint(0, 2, (7, 4), generator=gen).float() * 2 - 1
    texts = torch.randint(0, 2, (11, 4), generator=gen).float() * 2 - 1
    consistent = torch.rand(11, 7, generator=gen) < 0.3
    consistent[torch.arange(11), torch.arange(11) % 7] = True  # every caption and image has a match
    metrics = consistent_retrieval_metrics(images, texts, consistent, ks=(1, 2, 5), chunk_size=4)
    for k in (1, 2, 5):
        expected = _brute_force(images, texts, consistent, k)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, abs=1e-9), key


def test_single_positive_case_equals_strict_recall():
    gen = torch.Generator().manual_seed(3)
    images, texts = torch.randn(6, 8, generator=gen), torch.randn(18, 8, generator=gen)
    owner = torch.arange(18) // 3
    strict = retrieval_metrics(images, texts, owner)
    consistent = consistent_retrieval_metrics(images, texts, consistency_matrix([[int(i)] for i in owner], 6))
    for key, value in strict.items():
        assert consistent[f"consistent_{key}"] == pytest.approx(value)


def test_average_precision_of_known_rankings():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.1, 0.0]])
    positive = torch.tensor([[True, False, True, False], [True, False, False, False]])
    # row 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; row 1: a tie with a negative puts it second
    assert average_precision(scores, positive).tolist() == pytest.approx([(1 + 2 / 3) / 2, 1 / 2])


def test_bad_consistency_lists_are_refused():
    with pytest.raises(ValueError, match="caption 1 lists no consistent image"):
        consistency_matrix([[0], []], 2)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        consistency_matrix([[0], [2]], 2)
    with pytest.raises(ValueError, match="some captions have consistent_imgids"):
        consistent_indices("x.json", [5, 6], [[5], None])
    with pytest.raises(ValueError, match="names image 7 that is not in the evaluated split"):
        consistent_indices("x.json", [5, 6], [[5], [7]])
    assert consistent_indices("x.json", [5, 6], [[6, 5], [6]]) == [[1, 0], [1]]


def _independent_fit(content, objects):
    """Brute force over every assignment of mentions to objects, written without the library's helpers."""
    for chosen in itertools.permutations(range(len(objects)), len(content.mentions)):
        ok = True
        for mention, j in zip(content.mentions, chosen):
            o = objects[j]
            ok &= o.shape == mention.shape and mention.colour in (None, o.colour) and mention.size in (None, o.size)
        if ok and content.relation is not None:
            a, b = objects[chosen[0]].box, objects[chosen[1]].box
            dx, dy = (a[0] + a[2]) - (b[0] + b[2]), (a[1] + a[3]) - (b[1] + b[3])
            side = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
            ok &= side == content.relation
        if ok:
            return True
    return False


def test_consistent_images_equal_brute_force():
    rng = np.random.default_rng(0)
    images = [sample_objects(rng, 64, int(rng.integers(1, 5))) for _ in range(40)]
    contents = [caption_with_content(rng, images[i % 40])[1] for i in range(120)]
    contents += [CaptionContent((Mention("star"),)), CaptionContent((Mention("circle", "red", "small"),)),
                 CaptionContent((Mention("square"), Mention("square")), "left")]
    fitting = consistent_images(contents, images)
    for content, found in zip(contents, fitting):
        expected = [i for i, objs in enumerate(images) if _independent_fit(content, objs)]
        assert found == expected
        assert found == [i for i, objs in enumerate(images) if fits(content, objs)]
    for i in range(120):  # every caption fits its own image
        assert i % 40 in fitting[i]
    assert sum(len(f) > 1 for f in fitting) > 30  # and many fit several


def test_generated_retrieval_set_lists_consistent_images(tmp_path):
    generate(tmp_path, ShapesConfig(num_train=0, num_retrieval=30, num_classification_per_class=0), progress=False)
    path = tmp_path / "eval/retrieval/dataset_karpathy.json"
    entries = json.loads(path.read_text())["images"]
    for entry in entries:
        for sentence in entry["sentences"]:
            assert entry["imgid"] in sentence["consistent_imgids"]
            content = CaptionContent.from_json(sentence["content"])
            assert sentence["consistent_imgids"] == [e["imgid"] for e in entries if _independent_fit(
                content, [_obj(o) for o in e["objects"]])]
    data = load_retrieval_set("shapes-retrieval", tmp_path / "eval/retrieval")
    assert len(data.consistent) == len(data.captions) == 150
    assert all(owner in fitting for owner, fitting in zip(data.caption_to_image, data.consistent))


def _obj(record):
    from softclip.pipeline.shapes import ShapesObject

    return ShapesObject(shape=record["shape"], colour=record["colour"], size=record["size"],
                        box=tuple(record["box"]))


def test_target_lift_is_one_for_uniform_targets_and_grows_with_informed_mass():
    from softclip.pipeline.shapes_captions import ShapesObject, sharing_matrix, target_lift

    def obj(shape, colour):
        return ShapesObject(shape=shape, colour=colour, size="small", box=(0.0, 0.0, 10.0, 10.0))

    images = [[obj("star", "red")], [obj("star", "red"), obj("ring", "blue")], [obj("ring", "blue")],
              [obj("star", "blue")]]
    shared = sharing_matrix(images)
    assert shared.tolist() == [[True, True, False, False], [True, True, True, False],
                               [False, True, True, False], [False, False, False, True]]
    uniform = (1 - np.eye(4)) / 3
    assert target_lift(uniform, shared) == pytest.approx(1.0)
    informed = np.where(shared & ~np.eye(4, dtype=bool), 1.0, 0.0)
    informed[3] = uniform[3]  # nothing shares with image 3: its mass stays uniform
    informed /= informed.sum(axis=1, keepdims=True)
    # base rate 4 / 12; mass on shared pairs: 1, 1, 1, 0 -> mean 0.75 -> lift 2.25
    assert target_lift(informed, shared) == pytest.approx(0.75 / (4 / 12))
    assert np.isnan(target_lift(uniform, np.eye(4, dtype=bool)))
