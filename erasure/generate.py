"""Seeded, batched image generation, and image folders with a manifest.

* :func:`generate`: one ``torch.Generator`` per image, so the initial noise of an image depends on its seed alone,
  never on the batch it is drawn in. The denoising arithmetic of batched kernels can still differ in the last bits
  of float32 between batch sizes (on the order of 1e-6 on CPU), so an image generated in another batch size equals
  the original up to float rounding: at most one step of the uint8 scale, in rare pixels.
* :func:`save_images` writes images as ``{case_number}_{i}.png`` (the naming of ESD's and UCE's evaluation scripts)
  with a ``manifest.json`` describing each image (prompt, seed, ...), atomically: into a temporary folder that is
  then renamed into place. :func:`read_image_folder` reads such a folder back, or any folder of PNG/JPEG images.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "erasure-images/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_CASE_NAME = re.compile(r"^(-?\d+)_(\d+)$")


def image_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image, each seeded with its own seed."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 16,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair.

    The initial latents of image ``i`` are drawn from ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so the
    same prompt and seed start from the same noise whatever the batch size or device (the finished image can
    differ by float rounding between batch sizes: see the module docstring).

    Args:
        pipe: A diffusers Stable Diffusion (or SDXL) pipeline.
        prompts: One prompt per image.
        seeds: One seed per image.
        steps: Denoising steps of the pipeline's scheduler.
        guidance_scale: Classifier-free guidance scale.
        batch_size: Images per pipeline call.
        height: Image height (default: the pipeline's native size).
        width: Image width (default: the pipeline's native size).
        progress: Show a progress bar over batches.

    Returns:
        uint8 array of shape ``(N, H, W, 3)``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    channels = pipe.unet.config.in_channels
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress or None):
        batch_prompts = list(prompts[start : start + batch_size])
        generators = image_generators(seeds[start : start + batch_size])
        shape = (channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
        latents = latents.to(pipe.device, pipe.unet.dtype)
        output = pipe(
            batch_prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            latents=latents,
            output_type="np",
        )
        images.append((np.clip(output.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for entry, image in zip(entries, images, strict=True):
            write_image(temporary / entry["file"], image)
        write_manifest(temporary, entries, metadata or {})
        replace_folder(temporary, folder)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return folder


def replace_folder(source: Path, destination: Path) -> None:
    """Rename ``source`` to ``destination``, replacing an existing ``destination`` (moved aside, then deleted)."""
    if destination.exists():
        trash = destination.parent / f".{destination.name}.old-{os.getpid()}"
        os.replace(destination, trash)
        try:
            os.replace(source, destination)
        except BaseException:
            os.replace(trash, destination)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, destination)


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
