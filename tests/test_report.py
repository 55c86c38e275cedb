"""The HTML report: built from a real ``run_evaluation`` output (tiny random open_clip), self-contained, with the
metrics table, inlined grid, sweep plots; and rendered in headless Chromium when it is installed."""

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.cli import main
from erasure.evaluation import run_evaluation
from erasure.files import save_images
from erasure.report import (
    METRIC_COLUMNS,
    ReportError,
    load_evaluation,
    load_sweep,
    render_report,
    sweep_point,
    tradeoff_svg,
    write_report,
    write_sweep,
)

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
RED, BLUE = (230, 0, 0), (0, 0, 230)
ROWS = [("a drawing of Pip", "erased", "Pip"), ("an image of Pip", "erased", "Pip"),
        ("a drawing of Zog", "preserved", "Zog"), ("a drawing of Miro", "preserved", "Miro")]  # fmt: skip


def save_tiny_clip(folder: Path) -> Path:
    import open_clip
    from safetensors.torch import save_file

    if "report-tiny-clip" not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as configs:
            Path(configs, "report-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
            open_clip.add_model_config(configs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("report-tiny-clip", pretrained=None)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": preprocess}))
    return folder


def write_model_images(folder: Path, colour) -> None:
    images = np.zeros((len(ROWS), 64, 64, 3), np.uint8)
    images[:] = colour
    images[:, :8, :8] = 255 - np.asarray(colour, np.uint8)  # a mark: one flat colour is a degenerate image
    classes = ["Pip", "Zog", "Miro"]
    records = [
        {
            "case_number": i,
            "index": 0,
            "seed": 40 + i,
            "prompt": prompt,
            "row": {"evaluation_seed": 40 + i, "concept": concept, "type": kind, "classes": classes},
        }
        for i, (prompt, kind, concept) in enumerate(ROWS)
    ]
    save_images(folder, images, records, {"model": folder.name, "steps": 25, "guidance": 7.5})


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """A real evaluation folder: base (red images) and uce (blue images) scored by a tiny random CLIP."""
    root = tmp_path_factory.mktemp("report")
    write_model_images(root / "images" / "base", RED)
    write_model_images(root / "images" / "uce", BLUE)
    clip = save_tiny_clip(root / "clip")
    out = run_evaluation(root / "eval", images=root / "images", clip=str(clip), progress=False)
    return out


def data_uri_images(text):
    found = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    return [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in found]


def test_report_has_a_table_row_per_model_and_an_inlined_grid(evaluation):
    document = json.loads((evaluation / "metrics.json").read_text())
    text = render_report([evaluation])
    for label, metrics in document["metrics"].items():
        row = re.search(rf"<tr><th>{label}\b.*?</tr>", text)
        assert row, f"no table row for {label}"
        for key, _, pattern in METRIC_COLUMNS:
            if isinstance(metrics.get(key), float):
                assert pattern.format(metrics[key]) in row.group(0)
    assert document["clip"]["model"] in text and "per prompt row" in text
    (grid,) = data_uri_images(text)
    pixels = np.asarray(grid).reshape(-1, 3)
    assert (pixels == RED).all(axis=1).sum() > 64 * 64 and (pixels == BLUE).all(axis=1).sum() > 64 * 64
    # nothing is loaded from elsewhere
    assert not re.search(r"(src|href)=['\"](https?:|//|file:)", text)
    assert "<link" not in text and "url(" not in text and "<script" not in text


def test_a_grid_png_in_the_folder_is_used_as_is(evaluation, tmp_path):
    folder = tmp_path / "eval"
    shutil.copytree(evaluation, folder)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "grid.png")
    (grid,) = data_uri_images(render_report([folder]))
    assert grid.size == (40, 30) and grid.getpixel((5, 5)) == (1, 2, 3)


def test_sweep_is_plotted_and_tabulated(evaluation, tmp_path):
    folder = tmp_path / "eval"
    shutil.copytree(evaluation, folder)
    points = [sweep_point(evaluation, scale) for scale in (0.0, 0.5, 1.0)]
    assert points[0]["efficacy"] == json.loads((evaluation / "metrics.json").read_text())["metrics"]["uce"]["efficacy"]
    write_sweep(folder / "sweep.json", points, method="uce")
    text = render_report([folder])
    assert text.count("<svg") == 2 and "Strength sweep" in text and "method: uce" in text
    assert text.count("<circle") >= 3  # one marker per point on the trade-off plot
    for label in ("s=0", "s=0.5", "s=1"):
        assert label in text


def test_load_sweep_forms_and_errors(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps([{"scale": 1, "efficacy": 0.9, "preservation": 0.7}, {"scale": 0, "efficacy": 0.1}]))
    points, meta = load_sweep(path)
    assert [p["scale"] for p in points] == [0, 1] and points[1]["paired_preservation"] == 0.7 and meta == {}
    path.write_text(json.dumps({"format": "erasure-sweep/1", "edit": "x", "points": [{"scale": 0.5}]}))
    assert load_sweep(path)[1] == {"format": "erasure-sweep/1", "edit": "x"}
    path.write_text(json.dumps([{"efficacy": 0.2}]))
    with pytest.raises(ReportError, match="scale"):
        load_sweep(path)
    with pytest.raises(ValueError, match="scale"):
        write_sweep(path, [{"efficacy": 1.0}])


def test_tradeoff_svg_has_one_line_per_series():
    points = [{"scale": s, "efficacy": s, "specificity": 1 - s / 2, "model": m} for m in "ab" for s in (0, 0.5, 1)]
    svg = tradeoff_svg(points)
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 6 and "specificity" in svg


def test_missing_folder_and_bad_metrics_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="No evaluation folder"):
        load_evaluation(tmp_path / "nope")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ReportError, match="metrics"):
        load_evaluation(tmp_path)


def test_report_command_writes_atomically(evaluation, tmp_path, capsys):
    out = tmp_path / "site" / "report.html"
    assert main(["report", str(evaluation), str(evaluation), "--out", str(out), "--title", "Two runs"]) == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<title>Two runs</title>" in text
    assert text.count("<section") == 2
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 1
    assert not (tmp_path / "r.html").exists()
    assert "No evaluation folder" in capsys.readouterr().err


def test_report_refuses_to_replace_an_existing_report_unless_told(evaluation, tmp_path, capsys):
    out = tmp_path / "report.html"
    out.write_text("the old report")
    assert main(["report", str(evaluation), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_text() == "the old report"
    assert main(["report", str(evaluation), "--out", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html"
    ]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(evaluation, tmp_path):
    folder = tmp_path / "eval"
    shutil.copytree(evaluation, folder)
    write_sweep(folder / "sweep.json", [{"scale": s, "efficacy": s, "specificity": 1 - s / 3} for s in (0, 0.5, 1)])
    page = write_report([folder], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,2600",
               page.resolve().as_uri()]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=90)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert (pixels < 250).any(axis=1).mean() > 0.02, "the screenshot is blank"

    def count(colour, tolerance=6):
        return int((np.abs(pixels - colour) <= tolerance).all(axis=1).sum())

    assert count(RED) > 64 * 64 and count(BLUE) > 64 * 64, "the grid image did not render"
    assert count((0xDD, 0xE3, 0xF0), 2) > 500, "the tables' header cells did not render"
    assert count((0xD6, 0x27, 0x28), 10) > 50, "the trade-off plot did not render"
