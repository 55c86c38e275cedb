"""Files written so that nothing is half-written: atomic paths, folders replaced in one rename, image folders.

Every output of the toolkit (edits, image folders, CSV/JSON metrics, grids, reports, exports) goes through this
module, so one rule holds everywhere: data is written to a temporary name beside its destination and renamed into
place only when complete. A crash, a full disk or Ctrl-C leaves the old file (or nothing) behind, never a truncated
one; temporary names start with ``.`` and end with ``.tmp``.

* :func:`atomic_path` yields a temporary path that becomes ``path`` when the block succeeds.
* :func:`atomic_write_text` / :func:`atomic_write_bytes` write one file that way.
* :func:`replace_folder` renames a finished folder over an existing one (moved aside first, restored on failure).
* :func:`save_images` writes images as ``{case_number}_{i}.png`` (the naming of ESD's and UCE's evaluation scripts)
  with a ``manifest.json`` describing each image (prompt, seed, ...); :func:`read_image_folder` reads such a folder
  back, or any folder of PNG/JPEG images.
* :func:`to_pil` turns any image array (uint8, or float in 0..1; grey, RGB or RGBA) into an RGB PIL image.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "erasure-images/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_CASE_NAME = re.compile(r"^(-?\d+)_(\d+)$")

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------


class OutputBusyError(RuntimeError):
    """Another live process is writing the same output (it holds the output's lock file)."""


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


_held_locks: dict[Path, int] = {}


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[None]:
    """Hold ``.{name}.lock`` beside ``path`` for the block, so two processes never write one output at once.

    The lock file holds the writer's process id; a lock left by a process that no longer runs (killed with
    SIGKILL, a lost node) is taken over. Re-entrant within a process: a save inside a locked command does not
    deadlock on its own lock.

    Raises:
        OutputBusyError: If a live process holds the lock.
    """
    path = Path(path).absolute()
    if path in _held_locks:
        _held_locks[path] += 1
        try:
            yield
        finally:
            _held_locks[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(path)
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                raise OutputBusyError(
                    f"{path} is being written by another process (pid {owner}); wait for it to finish, or choose "
                    "another output."
                ) from None
            lock.unlink(missing_ok=True)  # left by a process that is gone
            continue
        with os.fdopen(handle, "w") as file:
            file.write(f"{os.getpid()}\n")
        break
    else:
        raise OutputBusyError(f"Could not take the lock {lock}; another process is racing for {path}.")
    _held_locks[path] = 1
    try:
        yield
    finally:
        del _held_locks[path]
        lock.unlink(missing_ok=True)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files and folders an interrupted write to ``path`` left beside it.

    Temporaries are named ``.{name}.{pid}.*.tmp``; those of a process that no longer runs (killed with SIGKILL, a
    lost node) are removed, those of a live process kept. Called by :func:`atomic_path` before each write.

    Returns:
        The paths removed.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    stem = f".{path.name}."
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not (name.startswith(stem) and name.endswith(".tmp")):
            continue
        pid_text = name[len(stem) :].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    if removed:
        logger.warning(
            "Removed %d temporary item(s) beside %s left by an interrupted run (e.g. %s).",
            len(removed),
            path,
            removed[0].name,
        )
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it is renamed to ``path`` only when the block succeeds.

    The temporary path does not exist yet: create a file or a folder there; it gets the usual permissions of the
    umask (only its holder folder is private). A crash or error inside the block leaves nothing behind (and an
    existing ``path`` untouched); what a killed process left is removed by the next write to the same ``path``.
    The output's lock (:func:`output_lock`) is held throughout.

    Args:
        path: The destination file or folder.
        overwrite: Replace an existing ``path`` (a folder is moved aside, then deleted); otherwise refuse it.

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is false (nothing is overwritten).
        OutputBusyError: If another live process is writing ``path``.
        RuntimeError: If the block wrote nothing.
    """
    path = Path(path)
    with output_lock(path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another output path or remove it first.")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        holder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
        temporary = holder / path.name
        try:
            yield temporary
            if not temporary.exists():
                raise RuntimeError(f"Nothing was written for {path}.")
            if temporary.is_dir() or path.is_dir():
                replace_folder(temporary, path)
            else:
                os.replace(temporary, path)
        finally:
            shutil.rmtree(holder, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str, newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed into place.

    Args:
        path: Destination file.
        text: The contents.
        newline: Passed to ``open`` (``""`` keeps the CRLF line ends of CSV writers as they are).
    """
    path = Path(path)
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8", newline=newline) as file:
            file.write(text)
    return path


def replace_folder(source: Path, destination: Path) -> None:
    """Rename ``source`` to ``destination``, replacing an existing ``destination`` (moved aside, then deleted).

    If the final rename fails, the old ``destination`` is put back.
    """
    source, destination = Path(source), Path(destination)
    if destination.exists():
        prefix = _temporary_prefix(destination) + "old-"
        trash = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=destination.parent))
        trash.rmdir()
        os.replace(destination, trash)
        try:
            os.replace(source, destination)
        except BaseException:
            os.replace(trash, destination)
            raise
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(source, destination)


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def to_pil(image: Any):
    """An RGB PIL image from a PIL image or an array: uint8 (0..255) or float (0..1); (H, W), (H, W, 1/3/4).

    Raises:
        TypeError: For an array that is neither uint8 nor floating point.
        ValueError: For another shape, or float values outside [0, 1].
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"An image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}.")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"Images must be uint8 (0-255) or float (0-1) arrays, got dtype {array.dtype}.")
        if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
            raise ValueError("Float image arrays must hold finite values in [0, 1]; pass uint8 arrays for 0..255.")
        array = (array * 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")


# --------------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------------


class ImageFolderError(ValueError):
    """An image folder is missing, empty, inconsistent (mixed sizes, bad manifest) or cannot be written."""


def image_filename(case_number: int, index: int) -> str:
    """``{case_number}_{index}.png``: the name of image ``index`` of prompt row ``case_number``."""
    return f"{int(case_number)}_{int(index)}.png"


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write one uint8 ``(H, W, 3)`` image as PNG."""
    from PIL import Image

    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")


def write_manifest(folder: str | Path, records: Sequence[Mapping[str, Any]], metadata: Mapping[str, Any]) -> Path:
    """Write ``manifest.json``: ``{"format", "metadata", "images": [record, ...]}`` (records must hold ``file``)."""
    path = Path(folder) / MANIFEST_NAME
    document = {"format": MANIFEST_FORMAT, "metadata": dict(metadata), "images": [dict(r) for r in records]}
    path.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def save_images(
    folder: str | Path,
    images: np.ndarray | Sequence[np.ndarray],
    records: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save images as ``{case_number}_{index}.png`` with a ``manifest.json``, atomically.

    Everything is written to a temporary folder beside ``folder``, which is renamed into place at the end; an
    interrupted call leaves no half-written folder behind.

    Args:
        folder: Destination folder.
        images: uint8 images ``(N, H, W, 3)``.
        records: One dict per image with at least ``case_number`` and ``index`` (and usually ``prompt``, ``seed``);
            stored in the manifest with the file name added as ``file``.
        metadata: Run-level facts for the manifest (model, steps, guidance, ...).
        overwrite: Replace an existing ``folder``; otherwise an existing non-empty folder is refused.

    Returns:
        The folder.

    Raises:
        ImageFolderError: If the counts differ, two images share a name, or ``folder`` exists (without
            ``overwrite``).
    """
    folder = Path(folder)
    if len(images) != len(records):
        raise ImageFolderError(f"got {len(images)} images but {len(records)} records; give one record per image.")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise ImageFolderError(f"{folder} exists; choose another folder or pass overwrite=True.")
    entries = []
    for record in records:
        if "case_number" not in record or "index" not in record:
            raise ImageFolderError("each record needs 'case_number' and 'index'.")
        entries.append({"file": image_filename(record["case_number"], record["index"]), **record})
    names = [entry["file"] for entry in entries]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ImageFolderError(f"two images would both be saved as {duplicate}; (case_number, index) must be unique.")
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        for entry, image in zip(entries, images, strict=True):
            write_image(temporary / entry["file"], image)
        write_manifest(temporary, entries, metadata or {})
    return folder


@dataclass(frozen=True)
class ImageRecord:
    """One image of a folder.

    Attributes:
        path: The image file.
        case_number: Prompt row id (from the manifest, or the ``{case_number}_{i}`` file name); ``None`` if neither.
        index: Image index within the row (``i``); ``None`` if unknown.
        info: The manifest record (prompt, seed, ...), empty without a manifest.
    """

    path: Path
    case_number: int | None
    index: int | None
    info: Mapping[str, Any]


def read_image_folder(folder: str | Path) -> tuple[list[ImageRecord], dict[str, Any], tuple[int, int]]:
    """List a folder's images, from its ``manifest.json`` when there is one, else from the file names.

    Images are not decoded (only their headers are read, for the size check); load them with :func:`load_image`.

    Args:
        folder: A folder written by :func:`save_images`, or any folder of PNG/JPEG/WebP images (files named
            ``{case_number}_{i}.png`` are matched to prompt rows; others sort by name).

    Returns:
        ``(records, manifest metadata, (height, width))``.

    Raises:
        ImageFolderError: No such folder, no images in it, a manifest naming a missing file, or images of different
            sizes.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"No image folder at {folder}.")
    manifest_path = folder / MANIFEST_NAME
    metadata: dict[str, Any] = {}
    records: list[ImageRecord] = []
    if manifest_path.is_file():
        try:
            document = json.loads(manifest_path.read_text(encoding="utf-8"))
            entries = document["images"]
            metadata = dict(document.get("metadata", {}))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ImageFolderError(f"{manifest_path} is not a valid image manifest ({error}).") from error
        for entry in entries:
            path = folder / str(entry.get("file", ""))
            if not path.is_file():
                raise ImageFolderError(f"{manifest_path} lists {entry.get('file')!r}, which is not in {folder}.")
            case, index = entry.get("case_number"), entry.get("index")
            records.append(
                ImageRecord(path, None if case is None else int(case), None if index is None else int(index), entry)
            )
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for path in files:
            match = _CASE_NAME.match(path.stem)
            case, index = (int(match.group(1)), int(match.group(2))) if match else (None, None)
            records.append(ImageRecord(path, case, index, {}))
        records.sort(key=lambda r: (r.case_number is None, r.case_number or 0, r.index or 0, r.path.name))
    if not records:
        raise ImageFolderError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    sizes: dict[tuple[int, int], Path] = {}
    for record in records:
        try:
            with Image.open(record.path) as image:
                width, height = image.size
        except OSError as error:
            raise ImageFolderError(f"{record.path} is not a readable image ({error}).") from error
        sizes.setdefault((height, width), record.path)
        if len(sizes) > 1:
            (a, path_a), (b, path_b) = list(sizes.items())[:2]
            raise ImageFolderError(
                f"{folder} mixes image sizes: {path_a.name} is {a[1]}x{a[0]} but {path_b.name} is {b[1]}x{b[0]}; "
                "score images of one size at a time."
            )
    return records, metadata, next(iter(sizes))


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB ``(H, W, 3)``."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


TRAINING_IMAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".bmp")


def load_training_images(folder: str | Path) -> list[Any] | dict[str, list[Any]]:
    """A method's training images as RGB PIL images: the folder's images, or ``{subfolder name: images}``.

    Subfolders name the concepts their images show (one per concept of a multi-concept request); a folder without
    subfolders holds the images of a single concept. Files are read in name order.

    A file ``NAME.mask.EXT`` beside ``NAME.EXT`` is that image's mask of the concept's region (white: the concept,
    any size; read as greyscale "L"); it is not an image of its own, and rides on its image as
    ``image.info["mask"]``. Methods with a region loss (MACE) use it; the others ignore it.

    Raises:
        ImageFolderError: No such folder, a folder without images, a file that is not a readable image, or a mask
            without its image (named).
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"--images {folder} is not a folder.")

    def open_image(file: Path, mode: str) -> Any:
        try:
            with Image.open(file) as image:
                return image.convert(mode)
        except (OSError, UnidentifiedImageError) as error:
            raise ImageFolderError(f"{file} is not a readable image ({error}); remove or replace it.") from error

    def read(path: Path) -> list[Any]:
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in TRAINING_IMAGE_SUFFIXES and p.is_file())
        masks = {p.name[: -len(".mask" + p.suffix)]: p for p in found if p.stem.lower().endswith(".mask")}
        files = [p for p in found if p not in masks.values()]
        orphans = sorted(set(masks) - {p.stem for p in files})
        if orphans:
            raise ImageFolderError(f"{masks[orphans[0]]} is a mask without its image ({orphans[0]}.*) in {path}.")
        if not files:
            raise ImageFolderError(f"No images ({', '.join(TRAINING_IMAGE_SUFFIXES)}) in {path}.")
        images = []
        for file in files:
            image = open_image(file, "RGB")
            if file.stem in masks:
                image.info["mask"] = open_image(masks[file.stem], "L")
            images.append(image)
        return images

    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    return {p.name: read(p) for p in subfolders} if subfolders else read(folder)
