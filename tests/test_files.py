"""erasure.files: atomic writes leave the old file or nothing, one to_pil for every image array, training images."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import erasure.files as files_module
from erasure.files import (
    ImageFolderError,
    OutputBusyError,
    atomic_path,
    atomic_write_text,
    load_training_images,
    output_lock,
    replace_folder,
    to_pil,
)


def test_atomic_write_replaces_a_file_only_when_complete(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_path_refuses_to_overwrite_when_asked_and_needs_output(tmp_path):
    (tmp_path / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"), atomic_path(tmp_path / "x", overwrite=False):
        pass
    with pytest.raises(RuntimeError, match="Nothing was written"), atomic_path(tmp_path / "y"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_atomic_path_replaces_a_folder_with_a_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        (temporary / "new.txt").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_replace_folder_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    old, new = tmp_path / "out", tmp_path / "new"
    old.mkdir()
    (old / "a").write_text("a")
    new.mkdir()
    real, calls = files_module.os.replace, []

    def flaky(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise OSError("power cut")
        return real(source, target)

    monkeypatch.setattr(files_module.os, "replace", flaky)
    with pytest.raises(OSError, match="power cut"):
        replace_folder(new, old)
    assert (old / "a").read_text() == "a"


@pytest.mark.parametrize(
    "array",
    [
        np.full((4, 5, 3), 200, np.uint8),
        np.full((4, 5), 200, np.uint8),
        np.full((4, 5, 1), 200, np.uint8),
        np.full((4, 5, 4), 200, np.uint8),
        np.full((4, 5, 3), 200 / 255, np.float32),
    ],
)
def test_to_pil_accepts_every_image_layout(array):
    image = to_pil(array)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert np.asarray(image)[0, 0].tolist() == [200, 200, 200]


def test_to_pil_refuses_bad_arrays_with_a_reason():
    with pytest.raises(ValueError, match="got shape"):
        to_pil(np.zeros((2, 3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"finite values in \[0, 1\]"):
        to_pil(np.full((2, 2, 3), 2.0))
    with pytest.raises(ValueError, match="finite"):
        to_pil(np.full((2, 2, 3), np.nan))
    with pytest.raises(TypeError, match="int64"):
        to_pil(np.zeros((2, 2, 3), np.int64))


def test_training_images_name_the_unreadable_file(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageFolderError, match=r"b\.png is not a readable image"):
        load_training_images(tmp_path)
    (tmp_path / "b.png").unlink()
    (images,) = [load_training_images(tmp_path)]
    assert len(images) == 1 and images[0].mode == "RGB"
    (tmp_path / "pip").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "pip" / "1.jpg")
    assert list(load_training_images(tmp_path)) == ["pip"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageFolderError, match="No images"):
        load_training_images(empty)


def test_a_mask_beside_its_image_rides_on_it_and_an_orphan_mask_is_named(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "a.png")
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "b.jpg")
    Image.new("RGB", (4, 4), "white").save(tmp_path / "a.mask.png")  # any mode: read as greyscale
    images = load_training_images(tmp_path)
    assert len(images) == 2 and images[0].getpixel((0, 0)) == (255, 0, 0)
    assert images[0].info["mask"].mode == "L" and images[0].info["mask"].getpixel((0, 0)) == 255
    assert "mask" not in images[1].info
    Image.new("L", (4, 4)).save(tmp_path / "c.mask.png")
    with pytest.raises(ImageFolderError, match=r"c\.mask\.png is a mask without its image"):
        load_training_images(tmp_path)


def test_outputs_get_the_umask_permissions_not_tempfiles_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "x")
        with atomic_path(tmp_path / "edit") as temporary:
            temporary.mkdir()
            (temporary / "edit.safetensors").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "edit").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "edit" / "edit.safetensors").stat().st_mode) == 0o644


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_a_killed_run_are_removed_by_the_next_write(tmp_path, caplog):
    stale = tmp_path / f".run.{dead_pid()}.abc.tmp"
    (stale / "run").mkdir(parents=True)
    live = tmp_path / f".run.{os.getppid()}.abc.tmp"  # a live process's temporary is left alone
    live.mkdir()
    other = tmp_path / ".other.1.abc.tmp"
    other.mkdir()
    with caplog.at_level("WARNING", logger="erasure.files"):
        atomic_write_text(tmp_path / "run", "x")
    assert not stale.exists() and live.exists() and other.exists()
    assert "interrupted run" in caplog.text


def test_a_live_writer_holds_the_output_and_a_dead_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    (tmp_path / ".run.lock").write_text(f"{os.getppid()}\n")
    with pytest.raises(OutputBusyError, match=rf"pid {os.getppid()}"):
        atomic_write_text(out, "x")
    assert not out.exists()
    (tmp_path / ".run.lock").write_text(f"{dead_pid()}\n")
    atomic_write_text(out, "x")
    assert out.read_text() == "x" and not (tmp_path / ".run.lock").exists()
    with output_lock(out), output_lock(out):  # re-entrant in one process
        atomic_write_text(out, "y")
    assert out.read_text() == "y" and not (tmp_path / ".run.lock").exists()
