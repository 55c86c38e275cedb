"""Loading the CLIP model an evaluation scores with: open_clip names and tags, ``hf-hub:`` repos and local folders.

A local folder declares what erasure needs to know about its CLIP beside the weights, in ``erasure_clip.json``
(:data:`CLIP_CARD_NAME`)::

    {
      "format": "erasure-clip/1",
      "templates": ["{}", "a picture of {}", ...],           # zero-shot templates, one "{}" each
      "preprocess_cfg": {"mean": [...], "std": [...]}         # optional: image normalisation of the model
    }

``templates`` replaces :data:`DEFAULT_TEMPLATES` (photo templates, right for CLIPs trained on web captions, wrong
for a CLIP trained on another caption grammar); ``preprocess_cfg`` overrides open_clip's preprocessing (needed
where the folder has only an architecture ``NAME.json``, whose preprocessing open_clip cannot know). Nothing in
this module knows any particular model: the shipped toy-world CLIP is a folder with such a file.

This module imports neither torch nor open_clip at import time, so the command line can list the choices below
without loading them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure.evaluation.errors import ClipLoadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLIP_CARD_FORMAT",
    "CLIP_CARD_NAME",
    "CLIP_CHOICES",
    "DEFAULT_CLIP",
    "DEFAULT_TEMPLATES",
    "ClipCard",
    "clip_card",
    "default_templates",
    "load_clip",
    "parse_clip_spec",
    "write_clip_card",
]

#: The default CLIP: OpenAI's ViT-L/14 (SD 1.x's text encoder), the usual CLIP-score model in erasure papers.
#: open_clip >= 2.29 builds OpenAI weights correctly only under the ``-quickgelu`` names.
DEFAULT_CLIP = "ViT-L-14-quickgelu:openai"
#: Documented choices for ``--clip`` (any open_clip ``name:tag`` works; see ``open_clip.list_pretrained()``).
CLIP_CHOICES: dict[str, str] = {
    "ViT-L-14-quickgelu:openai": "default; OpenAI CLIP ViT-L/14, the CLIP-score model of most erasure papers",
    "ViT-B-32-quickgelu:openai": "fast; OpenAI CLIP ViT-B/32",
    "ViT-H-14:laion2b_s32b_b79k": "strong; OpenCLIP ViT-H/14 (SD 2.x's text encoder family)",
    "ViT-L-14-336-quickgelu:openai": "CMMD's reference embedding (CLIP ViT-L/14 at 336 px)",
    "local-dir:checkpoints/toyworld-clip": "the shipped toy-world CLIP (or any folder with open_clip_config.json)",
}
#: Zero-shot templates for real images (``{}`` is replaced by the class text).
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "a painting of {}.", "an image of {}.", "{}")
CLIP_CARD_NAME = "erasure_clip.json"
CLIP_CARD_FORMAT = "erasure-clip/1"
#: ``preprocess_cfg`` keys of a CLIP card and the open_clip keyword each sets.
_PREPROCESS_KWARGS = {
    "mean": "image_mean",
    "std": "image_std",
    "interpolation": "image_interpolation",
    "resize_mode": "image_resize_mode",
}


@dataclass(frozen=True)
class ClipCard:
    """What a CLIP folder declares about itself in ``erasure_clip.json``.

    Attributes:
        templates: Zero-shot templates (each with one ``{}``); empty: :data:`DEFAULT_TEMPLATES`.
        preprocess: open_clip ``preprocess_cfg`` overrides (``mean``, ``std``, ``interpolation``, ``resize_mode``).
    """

    templates: tuple[str, ...] = ()
    preprocess: Mapping[str, Any] | None = None

    def open_clip_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``open_clip.create_model_and_transforms`` that apply :attr:`preprocess`."""
        return {_PREPROCESS_KWARGS[k]: v for k, v in (self.preprocess or {}).items() if k in _PREPROCESS_KWARGS}


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """Split ``--clip`` into ``(name, pretrained tag)``.

    ``NAME:TAG`` (``ViT-H-14:laion2b_s32b_b79k``) gives both; ``local-dir:PATH``, ``hf-hub:ORG/REPO`` and an existing
    folder give the spec itself with no tag; a bare name gives no tag.
    """
    spec = spec.strip()
    if spec.startswith(("local-dir:", "hf-hub:")) or Path(spec).expanduser().is_dir():
        return spec, None
    name, sep, tag = spec.rpartition(":")
    return (name, tag or None) if sep else (spec, None)


def _local_clip_folder(name: str) -> Path | None:
    if name.startswith("local-dir:"):
        return Path(name[len("local-dir:") :]).expanduser()
    path = Path(name).expanduser()
    if path.is_dir() or name.startswith(("./", "../", "/", "~")):
        return path
    return None


def _names_hint() -> str:
    return (
        'list names with `python -c "import open_clip; print(open_clip.list_models())"` and name:tag pairs with '
        "`open_clip.list_pretrained()`, or pass a folder holding open_clip_config.json and open_clip_model.safetensors"
    )


def clip_card(name: str) -> ClipCard | None:
    """The ``erasure_clip.json`` of a CLIP folder (``None`` for open_clip names, hub repos and folders without one).

    Raises:
        ClipLoadError: If the file is not valid JSON or its templates lack a ``{}``.
    """
    folder = _local_clip_folder(name)
    if folder is None or not (folder / CLIP_CARD_NAME).is_file():
        return None
    path = folder / CLIP_CARD_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ClipLoadError(f"{path} is not valid JSON ({error}); fix or delete it.") from error
    templates = data.get("templates") or ()
    preprocess = data.get("preprocess_cfg")
    if not isinstance(templates, list | tuple) or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise ClipLoadError(f"{path}: 'templates' must be a list of texts with one '{{}}' each, got {templates!r}.")
    if preprocess is not None and not isinstance(preprocess, Mapping):
        raise ClipLoadError(f'{path}: \'preprocess_cfg\' must be an object such as {{"mean": [...], "std": [...]}}.')
    return ClipCard(tuple(templates), dict(preprocess) if preprocess else None)


def write_clip_card(
    folder: str | Path, templates: tuple[str, ...] | list[str] = (), preprocess: Mapping[str, Any] | None = None
) -> Path:
    """Write ``erasure_clip.json`` into a CLIP folder (the inverse of :func:`clip_card`)."""
    document: dict[str, Any] = {"format": CLIP_CARD_FORMAT, "templates": list(templates)}
    if preprocess:
        document["preprocess_cfg"] = dict(preprocess)
    path = Path(folder) / CLIP_CARD_NAME
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def default_templates(name: str) -> tuple[str, ...]:
    """Zero-shot templates for a CLIP: those its folder declares (:func:`clip_card`), else photo templates."""
    card = clip_card(name)
    return card.templates if card is not None and card.templates else DEFAULT_TEMPLATES


def load_clip(
    name: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Load an open_clip model for evaluation.

    Args:
        name: An open_clip architecture (``ViT-L-14-quickgelu``, ``ViT-B-32-quickgelu``, ``ViT-H-14``), a folder
            (``checkpoints/toyworld-clip`` or ``local-dir:PATH``) holding ``open_clip_config.json`` and
            ``open_clip_model.safetensors`` (or an architecture ``NAME.json`` plus one ``.safetensors`` file), or
            ``hf-hub:ORG/REPO``. A folder's ``erasure_clip.json`` may override the preprocessing.
        pretrained: An open_clip pretrained tag for ``name`` (``openai``, ``laion2b_s32b_b79k``), a local
            ``.safetensors`` file, or ``None`` for random weights. Ignored for folders and ``hf-hub:`` names.
        device: Where to put the model.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode, the evaluation transform (PIL image -> tensor)
        and the tokenizer (list of texts -> token ids).

    Raises:
        ClipLoadError: For an unknown name or tag, a tag whose activation does not match the architecture (OpenAI
            weights need ``-quickgelu`` names since open_clip 2.29), or a folder without config or weights.
    """
    import open_clip

    folder = _local_clip_folder(name)
    if folder is not None:
        model, preprocess, tokenizer = _load_clip_folder(folder, device)
    elif name.startswith("hf-hub:"):
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        if name not in open_clip.list_models():
            raise ClipLoadError(f"Unknown CLIP model '{name}'; {_names_hint()}.")
        if pretrained and not Path(pretrained).is_file():
            _check_pretrained_tag(name, pretrained)
        if pretrained and Path(pretrained).is_file() and Path(pretrained).suffix != ".safetensors":
            raise ClipLoadError(f"Refusing to unpickle {pretrained}: convert the weights to .safetensors first.")
        try:
            with _quiet_root_logger():  # open_clip logs the hub's failure on the root logger before raising it
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained or None, device=device
                )
        except (RuntimeError, OSError) as error:
            if not pretrained or Path(pretrained).is_file():
                raise
            raise ClipLoadError(
                f"The weights of CLIP {name}:{pretrained} are not in the local cache and could not be downloaded "
                "(offline, or the hub is unreachable): fetch them once with network access, or pass a local folder "
                "holding open_clip_config.json and open_clip_model.safetensors (--clip DIR)."
            ) from error
        tokenizer = open_clip.get_tokenizer(name)
    return model.eval(), preprocess, tokenizer


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def _check_pretrained_tag(name: str, tag: str) -> None:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none (this architecture has no released weights)"
        raise ClipLoadError(f"CLIP '{name}' has no pretrained tag '{tag}'; its tags: {known}.")
    tag_quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    model_quick_gelu = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if tag_quick_gelu != model_quick_gelu:
        fixed = f"{name}-quickgelu" if tag_quick_gelu else name.removesuffix("-quickgelu")
        raise ClipLoadError(
            f"The '{tag}' weights were trained with {'QuickGELU' if tag_quick_gelu else 'GELU'} but '{name}' uses "
            f"{'QuickGELU' if model_quick_gelu else 'GELU'} (open_clip >= 2.29 no longer switches it): use "
            f"'{fixed}:{tag}'."
        )


def _load_clip_folder(folder: Path, device: str | torch.device) -> tuple[torch.nn.Module, Callable, Callable]:
    import open_clip

    if not folder.is_dir():
        raise ClipLoadError(f"No CLIP folder at {folder}; {_names_hint()}.")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth"}]
        advice = f" ({', '.join(pickles)} are pickles: convert them to .safetensors)" if pickles else ""
        raise ClipLoadError(f"{folder} holds no .safetensors weights{advice}.")
    card = clip_card(str(folder)) or ClipCard()
    if (folder / "open_clip_config.json").is_file():
        spec = f"local-dir:{folder}"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec, device=device, **card.open_clip_kwargs()
            )
            tokenizer = open_clip.get_tokenizer(spec)
        except (ValueError, RuntimeError, KeyError) as error:
            raise ClipLoadError(f"Could not load the CLIP in {folder}: {error}") from error
        return model, preprocess, tokenizer
    configs = [p for p in folder.glob("*.json") if "vision_cfg" in p.read_text(encoding="utf-8", errors="ignore")]
    if len(configs) != 1 or len(weights) != 1:
        raise ClipLoadError(
            f"{folder} has no open_clip_config.json; it then needs exactly one architecture NAME.json and one "
            f".safetensors file (found {len(configs)} and {len(weights)})."
        )
    open_clip.add_model_config(folder)
    name = configs[0].stem
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(weights[0]), device=device, **card.open_clip_kwargs()
    )
    return model, preprocess, open_clip.get_tokenizer(name)
