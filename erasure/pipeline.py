"""Loading Stable Diffusion pipelines, and telling their families apart.

* :func:`load_pipeline` accepts a Hugging Face hub id, a local diffusers folder or a single-file ``.safetensors``
  checkpoint, and fails with a one-line :class:`PipelineLoadError` that says what to do.
* :func:`detect_family` tells SD 1.x, SD 2.x and SDXL apart; :func:`prediction_type` reads the parameterisation.

The diffusion maths on a loaded pipeline (conditioning, noise prediction) is in :mod:`erasure.diffusion`; key maps
between diffusers and the original LDM layout in :mod:`erasure.convert`; writing models in :mod:`erasure.export`.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

__all__ = [
    "CorruptCheckpointError",
    "ModelFamily",
    "ModelNotFoundError",
    "PipelineLoadError",
    "UnsafeCheckpointError",
    "default_image_size",
    "detect_family",
    "load_pipeline",
    "prediction_type",
]

#: ``owner/name`` as on the Hugging Face hub.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
_HUB_PROBE_TIMEOUT_S = 10.0


class ModelFamily(enum.StrEnum):
    """Architecture family of a Stable Diffusion pipeline."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


class PipelineLoadError(Exception):
    """A pipeline could not be loaded. The message is one line and says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ModelNotFoundError(PipelineLoadError):
    """No model at the given path, in the local cache, or on the hub."""


class UnsafeCheckpointError(PipelineLoadError):
    """The file is a pickle (``.ckpt``/``.pt``), which can run code when loaded; it is refused."""


class CorruptCheckpointError(PipelineLoadError):
    """The file exists but cannot be read as (complete) weights."""


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_pipeline(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    config: str | Path | None = None,
    progress: bool = True,
    without_vae: bool = False,
    **kwargs: Any,
) -> DiffusionPipeline:
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline, with the safety checker off.

    Args:
        model: A hub id (``CompVis/stable-diffusion-v1-4``), a local diffusers folder (with ``model_index.json``)
            or a single-file ``.safetensors`` checkpoint in the original (LDM) layout. Pickled checkpoints
            (``.ckpt``, ``.pt``) are refused: convert them to safetensors first.
        device: Where to put the pipeline; CPU when not given.
        dtype: Parameter dtype; ``torch.float32`` when not given.
        config: Single files only: a diffusers folder or hub id whose configs (model_index, tokenizer, scheduler,
            model configs) describe the checkpoint. Without it diffusers infers a hub repo, which needs its
            files in the local cache or network access.
        progress: Show diffusers' and transformers' loading bars (``False`` silences them for this call only).
        without_vae: Leave the VAE unloaded (``pipe.vae`` is ``None``), for work that never samples or decodes an
            image (a closed-form edit reads only text embeddings and UNet weights). ``pipe.vae_scale_factor`` keeps
            the checkpoint's own factor (read from a folder's VAE config; diffusers' 8, that of every published SD
            VAE, for a hub id). Single-file checkpoints hold the VAE in the same file and always load it.
        **kwargs: Passed on to the diffusers loader (for example ``revision`` or ``variant``).

    Returns:
        The pipeline, in eval mode, on ``device`` in ``dtype``.

    Raises:
        PipelineLoadError: With a one-line message saying what to do (subclasses: ``ModelNotFoundError``,
            ``UnsafeCheckpointError``, ``CorruptCheckpointError``).
    """
    source = str(model)
    path = Path(source).expanduser()
    if config is not None and not path.is_file():
        raise PipelineLoadError(
            f"config= only applies to single-file checkpoints, and {source} is not a file: drop config=, or pass "
            "the .safetensors file."
        )
    vae_factor = None
    if without_vae and not path.is_file():
        kwargs = {**kwargs, "vae": None}
        vae_factor = _folder_vae_factor(path) if path.is_dir() else None
    with _loading_bars(progress):
        pipe = _load(source, path, config, kwargs)
    if vae_factor is not None:
        pipe.vae_scale_factor = vae_factor
    _check_all_weights_loaded(pipe, source)
    pipe = _move(pipe, torch.device(device) if device is not None else torch.device("cpu"), dtype or torch.float32)
    family = detect_family(pipe)
    logger.info(
        "Loaded %s from %s: family %s, %s prediction.",
        type(pipe).__name__,
        source,
        family,
        prediction_type(pipe),
    )
    return pipe


@contextlib.contextmanager
def _loading_bars(enabled: bool) -> Iterator[None]:
    """Turn diffusers' and transformers' progress bars off while the block runs (when not ``enabled``)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    were_enabled = [library.is_progress_bar_enabled() for library in libraries]
    try:
        if not enabled:
            for library in libraries:
                library.disable_progress_bar()
        yield
    finally:
        for library, was_enabled in zip(libraries, were_enabled, strict=True):
            (library.enable_progress_bar if was_enabled else library.disable_progress_bar)()


def _load(source: str, path: Path, config: str | Path | None, kwargs: dict[str, Any]) -> DiffusionPipeline:
    """Dispatch on what ``source`` is: a folder, a single file, or a hub id."""
    if path.is_dir():
        return _load_folder(path, kwargs)
    if path.is_file():
        return _load_single_file(path, config, kwargs)
    if _looks_like_path(source):
        raise ModelNotFoundError(
            f"No such file or folder: {source}. Check the path, or pass a hub id such as "
            "'CompVis/stable-diffusion-v1-4'."
        )
    if HUB_ID_PATTERN.match(source):
        return _load_hub(source, kwargs)
    raise ModelNotFoundError(
        f"'{source}' is neither an existing file or folder nor a hub id of the form owner/name "
        "(e.g. 'CompVis/stable-diffusion-v1-4')."
    )


def _move(pipe: DiffusionPipeline, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """Move to ``device``; cast only when some floating-point weight differs (diffusers warns on every cast)."""
    pipe = pipe.to(device)
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    if any(p.is_floating_point() and p.dtype != dtype for m in modules for p in m.parameters()):
        pipe = pipe.to(dtype=dtype)
    return pipe


def _looks_like_path(source: str) -> bool:
    if source.startswith(("./", "../", "/", "~", ".\\", "..\\")) or "\\" in source or source.count("/") > 1:
        return True
    if Path(source).suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}:
        return True
    return os.sep in source and not HUB_ID_PATTERN.match(source)


def _hub_offline() -> bool:
    if any(os.environ.get(flag, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in _OFFLINE_FLAGS):
        return True
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _reason(error: BaseException) -> str:
    """The first line of an exception, for one-line messages."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _pipeline_class(model_index: dict[str, Any], where: str) -> type[DiffusionPipeline]:
    """Pick the supported pipeline class from a ``model_index.json``."""
    class_name = model_index.get("_class_name", "?")

    def has(name: str) -> bool:  # entries are [library, class], [null, null] for a component saved as None
        entry = model_index.get(name)
        return isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is not None

    if has("unet") and has("vae") and has("text_encoder_2"):
        cls: type[DiffusionPipeline] = StableDiffusionXLPipeline
    elif all(has(name) for name in ("unet", "vae", "text_encoder", "tokenizer")):
        cls = StableDiffusionPipeline
    else:
        raise PipelineLoadError(
            f"{where} holds a {class_name}, not a Stable Diffusion pipeline; erasure supports SD 1.x, SD 2.x and "
            "SDXL (StableDiffusionPipeline, StableDiffusionXLPipeline)."
        )
    if class_name != cls.__name__:
        logger.warning("%s declares %s; loading it as %s.", where, class_name, cls.__name__)
    return cls


def _component_kwargs(cls: type[DiffusionPipeline]) -> dict[str, Any]:
    if cls is StableDiffusionPipeline:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def _load_error(where: str, error: BaseException, advice: str) -> PipelineLoadError:
    from safetensors import SafetensorError

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, SafetensorError | json.JSONDecodeError) or "deserializ" in str(cause).lower():
            return CorruptCheckpointError(
                f"Could not read the weights of {where} ({_reason(cause)}); the file is damaged or incomplete: "
                "download or save it again."
            )
        cause = cause.__cause__ or cause.__context__
    return PipelineLoadError(f"Could not load {where} ({type(error).__name__}: {_reason(error)}); {advice}")


def _load_folder(path: Path, kwargs: dict[str, Any]) -> DiffusionPipeline:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        hint = ""
        if any(path.glob("*.safetensors")):
            hint = " To load a single-file checkpoint, pass the .safetensors file itself."
        raise PipelineLoadError(
            f"{path} is a folder but not a diffusers pipeline (no model_index.json): pass the pipeline's root "
            f"folder, the one written by save_pretrained.{hint}"
        )
    try:
        model_index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(
            f"Could not read {index_file} ({_reason(error)}); save the pipeline again with save_pretrained."
        ) from error
    cls = _pipeline_class(model_index, str(path))
    try:
        return cls.from_pretrained(path, local_files_only=True, **_component_kwargs(cls), **kwargs)
    except Exception as error:
        raise _load_error(
            str(path), error, "check that the folder is a complete save_pretrained output (all subfolders present)."
        ) from error


def _load_hub(repo_id: str, kwargs: dict[str, Any]) -> DiffusionPipeline:
    probed = False
    try:
        model_index = _hub_model_index(repo_id, kwargs, local_files_only=True)
    except Exception as error:
        if _hub_offline():
            raise ModelNotFoundError(
                f"'{repo_id}' is not a local path, and it is not in the local Hugging Face cache while the hub is "
                "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set); download it once with network access, or pass "
                "a local folder or .safetensors file."
            ) from error
        _probe_hub(repo_id, kwargs)
        probed = True
        try:
            model_index = _hub_model_index(repo_id, kwargs, local_files_only=False)
        except Exception as error2:
            raise _load_error(f"'{repo_id}'", error2, "check the hub id and your connection.") from error2
    cls = _pipeline_class(model_index, f"'{repo_id}'")
    try:
        return cls.from_pretrained(repo_id, local_files_only=True, **_component_kwargs(cls), **kwargs)
    except Exception as error:
        if _hub_offline():
            raise _load_error(
                f"'{repo_id}'",
                error,
                "only part of it is in the local cache and the hub is offline: download it with network access.",
            ) from error
        logger.info("'%s' is not (fully) cached (%s); downloading it.", repo_id, _reason(error))
    if not probed:
        _probe_hub(repo_id, kwargs)
    try:
        return cls.from_pretrained(repo_id, **_component_kwargs(cls), **kwargs)
    except Exception as error:
        raise _load_error(f"'{repo_id}'", error, "check the hub id, your access to it and your connection.") from error


def _hub_model_index(repo_id: str, kwargs: dict[str, Any], local_files_only: bool) -> dict[str, Any]:
    hub_kwargs = {k: v for k, v in kwargs.items() if k in {"revision", "cache_dir", "token", "proxies"}}
    with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub has deprecated
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return dict(DiffusionPipeline.load_config(repo_id, local_files_only=local_files_only, **hub_kwargs))


def _probe_hub(repo_id: str, kwargs: dict[str, Any]) -> None:
    """Ask the hub about ``repo_id`` with a short timeout, turning failures into one-line errors."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        model_info(repo_id, revision=kwargs.get("revision"), token=kwargs.get("token"), timeout=_HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as error:
        raise ModelNotFoundError(
            f"'{repo_id}' is gated on the hub: accept its licence on huggingface.co and log in (`hf auth login`)."
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelNotFoundError(
            f"'{repo_id}' is not a local path and not a model on the Hugging Face hub (or it is private): check "
            "the id, or log in (`hf auth login`)."
        ) from error
    except RevisionNotFoundError as error:
        raise ModelNotFoundError(f"'{repo_id}' has no revision {kwargs.get('revision')!r}: check it.") from error
    except Exception as error:
        raise ModelNotFoundError(
            f"'{repo_id}' is not in the local Hugging Face cache and the hub could not be reached "
            f"({type(error).__name__}: {_reason(error)}); check your connection, or pass a local folder or "
            ".safetensors file."
        ) from error


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"{path} is not a readable safetensors file ({_reason(error)}); it is damaged or incomplete: download "
            "or export it again."
        ) from error


def _load_single_file(path: Path, config: str | Path | None, kwargs: dict[str, Any]) -> DiffusionPipeline:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"Refusing to load {path.name}: {suffix} files are pickles that can run code when loaded. Convert it "
            "to .safetensors once, where you trust it (torch.load(..., weights_only=True), then "
            "safetensors.torch.save_file), and pass the .safetensors file."
        )
    if suffix != ".safetensors":
        raise PipelineLoadError(
            f"Unsupported file {path.name}: pass a single-file .safetensors checkpoint or a diffusers folder."
        )
    keys = _safetensors_keys(path)
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise PipelineLoadError(
            f"{path.name} is not a full Stable Diffusion checkpoint (no model.diffusion_model.* weights; a LoRA or "
            "a lone UNet?): pass a complete single-file checkpoint or a diffusers folder."
        )
    is_sdxl = any(key.startswith("conditioner.embedders.1.") for key in keys)
    cls: type[DiffusionPipeline] = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    logger.info("%s looks like an %s checkpoint.", path.name, "SDXL" if is_sdxl else "SD 1.x/2.x")

    config_arg = None
    local_config = False
    if config is not None:
        config_path = Path(config).expanduser()
        if config_path.is_dir():
            config_arg, local_config = str(config_path), True
        elif HUB_ID_PATTERN.match(str(config)) and not _looks_like_path(str(config)):
            config_arg = str(config)
        else:
            raise ModelNotFoundError(
                f"config={config} is neither a folder nor a hub id: pass the diffusers folder (or hub id) whose "
                "configs match the checkpoint."
            )
    advice = (
        "check that config= names a diffusers pipeline of the same architecture as the checkpoint."
        if config_arg is not None
        else "pass config=<diffusers folder or hub id of the same architecture> (--model-config on the command "
        "line) to say how it is configured."
    )
    load_kwargs = {**_component_kwargs(cls), **kwargs}
    try:
        return cls.from_single_file(str(path), config=config_arg, local_files_only=True, **load_kwargs)
    except Exception as error:
        if local_config or _hub_offline():
            if not local_config:
                advice = (
                    "its configs are not in the local Hugging Face cache and the hub is offline: pass "
                    "config=<local diffusers folder of the same architecture> (--model-config on the command line)."
                )
            raise _load_error(path.name, error, advice) from error
        logger.info("Configs for %s are not cached (%s); trying the hub.", path.name, _reason(error))
    try:
        return cls.from_single_file(str(path), config=config_arg, **load_kwargs)
    except Exception as error:
        if config_arg is None:
            advice = (
                "its configs are neither in the local Hugging Face cache nor fetchable from the hub: pass "
                "config=<local diffusers folder of the same architecture> (--model-config on the command line)."
            )
        raise _load_error(path.name, error, advice) from error


def _folder_vae_factor(path: Path) -> int | None:
    """A pipeline folder's VAE downsampling factor, ``2 ** (len(block_out_channels) - 1)`` as diffusers computes it."""
    try:
        config = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
        return 2 ** (len(config["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the loader reports a broken folder in its own words


def _check_all_weights_loaded(pipe: DiffusionPipeline, source: str) -> None:
    """``from_single_file`` loads non-strictly; a weight left on the meta device means the checkpoint lacked it."""
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor_name, tensor in [*component.named_parameters(), *component.named_buffers()]:
            if tensor.is_meta:
                raise CorruptCheckpointError(
                    f"{source} has no weights for {name}.{tensor_name}: the checkpoint does not match its config; "
                    "pass config= naming a pipeline of the same architecture."
                )


# --------------------------------------------------------------------------------------------------------------
# Family and configuration
# --------------------------------------------------------------------------------------------------------------


def detect_family(pipe: DiffusionPipeline) -> ModelFamily:
    """Tell SD 1.x, SD 2.x and SDXL apart.

    SDXL has a second text encoder (or ``text_time`` micro-conditioning); SD 2.x has linear attention projections
    in the UNet (or 1024-wide cross-attention, OpenCLIP ViT-H); everything else is SD 1.x.

    Args:
        pipe: A Stable Diffusion pipeline.

    Returns:
        The family.
    """
    unet_config = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is not None or isinstance(pipe, StableDiffusionXLPipeline):
        return ModelFamily.SDXL
    if unet_config.get("addition_embed_type") == "text_time":
        return ModelFamily.SDXL
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        return ModelFamily.SD2
    return ModelFamily.SD1


def prediction_type(pipe: DiffusionPipeline) -> str:
    """What the UNet predicts, from the scheduler config: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``."""
    return str(pipe.scheduler.config.get("prediction_type", "epsilon"))


def default_image_size(pipe: DiffusionPipeline) -> int:
    """The image side the model was trained at: ``unet.config.sample_size * vae_scale_factor``."""
    sample_size = pipe.unet.config.sample_size
    if isinstance(sample_size, Sequence):
        sample_size = sample_size[0]
    return int(sample_size) * int(pipe.vae_scale_factor)


def execution_device(pipe: DiffusionPipeline) -> torch.device:
    """The device the pipeline runs its UNet on (diffusers' ``_execution_device``, which knows about offloading)."""
    return getattr(pipe, "_execution_device", None) or pipe.unet.device
