"""Seeded generation (batch-size invariance) and image folders with a manifest."""

import json

import numpy as np
import pytest
from PIL import Image

from erasure.files import MANIFEST_NAME, ImageFolderError, image_filename, load_image, read_image_folder, save_images
from erasure.generate import generate
from erasure.testing import tiny_pipeline

SIZE = 32


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def run(pipe, prompts, seeds, batch_size):
    return generate(pipe, prompts, seeds, steps=2, batch_size=batch_size, height=SIZE, width=SIZE, progress=False)


def assert_same_image(a, b):
    """Equal up to float rounding of batched kernels: at most one uint8 step, in a small share of the pixels."""
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.02


def test_batch_size_does_not_change_images(pipe):
    prompts, seeds = ["a red circle", "a cat", "Pip"], [1, 2, 3]
    one_by_one = run(pipe, prompts, seeds, batch_size=1)
    together = run(pipe, prompts, seeds, batch_size=3)
    assert one_by_one.shape == (3, SIZE, SIZE, 3) and one_by_one.dtype == np.uint8
    assert_same_image(one_by_one, together)
    # An image depends on its own prompt and seed only, not on its place in the batch.
    reordered = run(pipe, prompts[::-1], seeds[::-1], batch_size=3)
    assert_same_image(together, reordered[::-1])
    # ... and the seed matters (so the comparisons above are not vacuous).
    other = run(pipe, prompts, [4, 5, 6], batch_size=3)
    assert np.abs(other.astype(int) - together.astype(int)).mean() > 5


def test_generate_checks_lengths(pipe):
    with pytest.raises(ValueError, match="one seed per prompt"):
        run(pipe, ["a", "b"], [1], batch_size=1)


def images(count, size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_save_and_read_back(tmp_path):
    pictures = images(3)
    records = [{"case_number": c, "index": i, "prompt": f"p{c}", "seed": 10 + c} for c, i in [(0, 0), (0, 1), (7, 0)]]
    folder = save_images(tmp_path / "run", pictures, records, metadata={"steps": 2})
    assert sorted(p.name for p in folder.iterdir()) == ["0_0.png", "0_1.png", "7_0.png", MANIFEST_NAME]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["metadata"] == {"steps": 2} and manifest["images"][2]["file"] == "7_0.png"
    found, metadata, size = read_image_folder(folder)
    assert size == (SIZE, SIZE) and metadata == {"steps": 2}
    assert [(r.case_number, r.index, r.info["prompt"]) for r in found] == [(0, 0, "p0"), (0, 1, "p0"), (7, 0, "p7")]
    np.testing.assert_array_equal(np.stack([load_image(r.path) for r in found]), pictures)  # PNG is lossless
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_folder_without_manifest_is_read_from_file_names(tmp_path):
    for name in ("10_0.png", "2_1.png", "2_0.png"):
        Image.fromarray(images(1)[0]).save(tmp_path / name)
    found, metadata, _ = read_image_folder(tmp_path)
    assert [(r.case_number, r.index) for r in found] == [(2, 0), (2, 1), (10, 0)] and metadata == {}


def test_save_refuses_existing_folder_and_duplicates(tmp_path):
    records = [{"case_number": 1, "index": 0}]
    save_images(tmp_path / "a", images(1), records)
    with pytest.raises(ImageFolderError, match="exists"):
        save_images(tmp_path / "a", images(1), records)
    save_images(tmp_path / "a", images(1, seed=1), records, overwrite=True)
    np.testing.assert_array_equal(load_image(tmp_path / "a" / image_filename(1, 0)), images(1, seed=1)[0])
    with pytest.raises(ImageFolderError, match="both be saved as 1_0.png"):
        save_images(tmp_path / "b", images(2), records * 2)
    assert not (tmp_path / "b").exists()


def test_empty_and_mixed_size_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="holds no images"):
        read_image_folder(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(images(1, 32)[0]).save(mixed / "0_0.png")
    Image.fromarray(images(1, 16)[0]).save(mixed / "1_0.png")
    with pytest.raises(ImageFolderError, match="mixes image sizes"):
        read_image_folder(mixed)
    with pytest.raises(ImageFolderError, match="No image folder"):
        read_image_folder(tmp_path / "missing")


def test_without_progress_the_pipelines_step_bar_is_off_for_the_call_only():
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=False, desc="mine")
    seen = []
    original = pipe.progress_bar

    def spy(*args, **kwargs):
        seen.append(dict(pipe._progress_bar_config))
        return original(*args, **kwargs)

    pipe.progress_bar = spy
    generate(pipe, ["a red circle"], [0], steps=2, progress=False)
    assert seen == [{"disable": True, "desc": "mine"}]
    assert pipe._progress_bar_config == {"disable": False, "desc": "mine"}  # the caller's setting is back
