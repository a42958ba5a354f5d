"""Markdown table and chart from hand-made results."""

from softclip.eval.report import format_markdown, metric_title, write_report

RESULTS = {
    "CLIP": {"shapes-shape": {"top1": 0.5, "top5": None, "mean_per_class_recall": 0.25},
             "coco": {"image_to_text_R@1": 0.294, "text_to_image_R@1": 0.189}},
    "SoftCLIP": {"shapes-shape": {"top1": 0.625, "top5": None, "mean_per_class_recall": 0.25},
                 "coco": {"image_to_text_R@1": 0.36, "text_to_image_R@1": 0.222}},
}


def test_markdown_rows_per_checkpoint_and_delta_second_minus_first():
    text = format_markdown(RESULTS, ["CLIP", "SoftCLIP"], ["shapes-shape", "coco"], {"coco": "5000 images"})
    assert "## coco (5000 images)" in text
    assert "| checkpoint | image→text R@1 | text→image R@1 |" in text
    assert "| CLIP | 29.40 | 18.90 |" in text
    assert "| SoftCLIP | 36.00 | 22.20 |" in text
    assert "| Δ (SoftCLIP − CLIP) | +6.60 | +3.30 |" in text
    assert "| CLIP | 50.00 | n/a | 25.00 |" in text
    assert "| Δ (SoftCLIP − CLIP) | +12.50 | n/a | +0.00 |" in text


def test_single_checkpoint_has_no_delta_row():
    text = format_markdown({"CLIP": RESULTS["CLIP"]}, ["CLIP"], ["coco"])
    assert "Δ" not in text.split("percentage points.")[1]


def test_metric_titles_name_the_direction():
    assert metric_title("image_to_text_R@5") == "image→text R@5"
    assert metric_title("text_to_image_R@10") == "text→image R@10"
    assert metric_title("top1") == "top-1"


def test_write_report_writes_json_markdown_and_png(tmp_path):
    payload = {"labels": ["CLIP", "SoftCLIP"], "tasks": ["shapes-shape", "coco"], "results": RESULTS}
    paths = write_report(tmp_path, payload)
    assert paths["json"].read_text().startswith("{")
    assert "| SoftCLIP |" in paths["markdown"].read_text()
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp-*"))
