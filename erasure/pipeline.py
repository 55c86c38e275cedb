"""Loading Stable Diffusion pipelines and the diffusion maths every erasure method shares.

* :func:`load_pipeline` accepts a Hugging Face hub id, a local diffusers folder or a single-file ``.safetensors``
  checkpoint, and fails with a one-line :class:`PipelineLoadError` that says what to do.
* :func:`detect_family` tells SD 1.x, SD 2.x and SDXL apart; :func:`prediction_type` reads the parameterisation.
* :func:`encode_prompts` turns prompts into a :class:`Conditioning` (text embeddings, plus SDXL's pooled
  embeddings and micro-conditioning), and :func:`predict_noise` runs the UNet on it, with classifier-free
  guidance ``eps_uncond + g * (eps_cond - eps_uncond)`` in one batched forward when asked.
* :func:`single_file_state_dict` / :func:`save_single_file` write the original (LDM) single-file layout that
  ``from_single_file`` reads back.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "Conditioning",
    "CorruptCheckpointError",
    "ModelFamily",
    "ModelNotFoundError",
    "PipelineLoadError",
    "UnsafeCheckpointError",
    "default_image_size",
    "detect_family",
    "encode_prompts",
    "load_pipeline",
    "predict_noise",
    "prediction_type",
    "save_single_file",
    "single_file_state_dict",
    "unconditional_conditioning",
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
    if path.is_dir():
        pipe = _load_folder(path, kwargs)
    elif path.is_file():
        pipe = _load_single_file(path, config, kwargs)
    elif _looks_like_path(source):
        raise ModelNotFoundError(
            f"No such file or folder: {source}. Check the path, or pass a hub id such as "
            "'CompVis/stable-diffusion-v1-4'."
        )
    elif HUB_ID_PATTERN.match(source):
        pipe = _load_hub(source, kwargs)
    else:
        raise ModelNotFoundError(
            f"'{source}' is neither an existing file or folder nor a hub id of the form owner/name "
            "(e.g. 'CompVis/stable-diffusion-v1-4')."
        )
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
        else "pass config=<diffusers folder or hub id of the same architecture> to say how it is configured."
    )
    load_kwargs = {**_component_kwargs(cls), **kwargs}
    try:
        return cls.from_single_file(str(path), config=config_arg, local_files_only=True, **load_kwargs)
    except Exception as error:
        if local_config or _hub_offline():
            if not local_config:
                advice = (
                    "its configs are not in the local Hugging Face cache and the hub is offline: pass "
                    "config=<local diffusers folder of the same architecture>."
                )
            raise _load_error(path.name, error, advice) from error
        logger.info("Configs for %s are not cached (%s); trying the hub.", path.name, _reason(error))
    try:
        return cls.from_single_file(str(path), config=config_arg, **load_kwargs)
    except Exception as error:
        if config_arg is None:
            advice = (
                "its configs are neither in the local Hugging Face cache nor fetchable from the hub: pass "
                "config=<local diffusers folder of the same architecture>."
            )
        raise _load_error(path.name, error, advice) from error


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


def _execution_device(pipe: DiffusionPipeline) -> torch.device:
    return getattr(pipe, "_execution_device", None) or pipe.unet.device


# --------------------------------------------------------------------------------------------------------------
# Conditioning and noise prediction
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Text conditioning for a batch of prompts, without classifier-free-guidance doubling.

    Attributes:
        prompt_embeds: ``[B, 77, D]`` token embeddings fed to cross-attention.
        pooled_prompt_embeds: SDXL only: ``[B, P]`` pooled embedding of the second text encoder.
        add_time_ids: SDXL only: ``[B, 6]`` micro-conditioning (original size, crop top-left, target size).
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    add_time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> Conditioning:
        """Select prompts along the batch dimension; an integer keeps the batch dimension (size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda tensor: tensor[index])

    def _map(self, fn: Any) -> Conditioning:
        return Conditioning(
            fn(self.prompt_embeds),
            None if self.pooled_prompt_embeds is None else fn(self.pooled_prompt_embeds),
            None if self.add_time_ids is None else fn(self.add_time_ids),
        )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move (and optionally cast) every tensor."""
        return self._map(lambda tensor: tensor.to(device=device, dtype=dtype))

    def detach(self) -> Conditioning:
        """Detach every tensor from the autograd graph."""
        return self._map(Tensor.detach)

    def repeat(self, times: int) -> Conditioning:
        """Repeat every prompt ``times`` times in a row (``[a, b] -> [a, a, b, b]``)."""
        return self._map(lambda tensor: tensor.repeat_interleave(times, dim=0))

    def expand(self, batch_size: int) -> Conditioning:
        """Return a conditioning of ``batch_size`` prompts: itself, or a single prompt repeated.

        Raises:
            ValueError: If the batch is neither ``batch_size`` nor 1.
        """
        if len(self) == batch_size:
            return self
        if len(self) == 1:
            return self.repeat(batch_size)
        raise ValueError(
            f"Conditioning holds {len(self)} prompts but {batch_size} are needed; pass 1 or {batch_size}."
        )

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate conditionings along the batch dimension.

        Raises:
            ValueError: If the list is empty or mixes SDXL and non-SDXL conditionings.
        """
        if not items:
            raise ValueError("Conditioning.cat needs at least one conditioning.")
        has_pooled = {item.pooled_prompt_embeds is not None for item in items}
        if len(has_pooled) > 1:
            raise ValueError("Conditioning.cat cannot mix SDXL conditionings (with pooled embeddings) and others.")

        def cat_field(name: str) -> Tensor | None:
            tensors = [getattr(item, name) for item in items]
            return None if tensors[0] is None else torch.cat(tensors, dim=0)

        return Conditioning(cat_field("prompt_embeds"), cat_field("pooled_prompt_embeds"), cat_field("add_time_ids"))

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``UNet2DConditionModel.forward``."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            if self.add_time_ids is None:
                raise ValueError("An SDXL conditioning needs add_time_ids; build it with encode_prompts.")
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.add_time_ids}
        return kwargs


def _sdxl_time_ids(pipe: DiffusionPipeline, batch_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Micro-conditioning as the SDXL pipeline builds it for its default size, crops (0, 0)."""
    size = default_image_size(pipe)
    if pipe.text_encoder_2 is not None:
        projection_dim = int(pipe.text_encoder_2.config.projection_dim)
    else:
        time_embeddings = 6 * pipe.unet.config.addition_time_embed_dim
        projection_dim = int(pipe.unet.add_embedding.linear_1.in_features) - time_embeddings
    time_ids = pipe._get_add_time_ids(
        (size, size), (0, 0), (size, size), dtype=dtype, text_encoder_projection_dim=projection_dim
    )
    return time_ids.to(device).repeat(batch_size, 1)


def encode_prompts(
    pipe: DiffusionPipeline, prompts: str | Sequence[str], *, grad: bool = False, clip_skip: int | None = None
) -> Conditioning:
    """Encode prompts with the pipeline's own ``encode_prompt`` (no CFG doubling).

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        prompts: One prompt or a list of prompts.
        grad: Track gradients through the text encoder(s); off by default.
        clip_skip: Layers to skip from the end of the text encoder, as in diffusers.

    Returns:
        The conditioning; for SDXL with pooled embeddings and ``add_time_ids`` for the default image size.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = _execution_device(pipe)
    with torch.set_grad_enabled(grad):
        if detect_family(pipe) is ModelFamily.SDXL:
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=clip_skip,
            )
            time_ids = _sdxl_time_ids(pipe, len(prompts), prompt_embeds.dtype, device)
            return Conditioning(prompt_embeds, pooled, time_ids)
        prompt_embeds, _ = pipe.encode_prompt(prompts, device, 1, False, clip_skip=clip_skip)
        return Conditioning(prompt_embeds)


def unconditional_conditioning(pipe: DiffusionPipeline, batch_size: int = 1, *, grad: bool = False) -> Conditioning:
    """The conditioning the pipeline itself uses for CFG without a negative prompt.

    That is the empty prompt, except for SDXL pipelines with ``force_zeros_for_empty_prompt``, which use zeros.

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        batch_size: Number of copies.
        grad: Track gradients through the text encoder(s).

    Returns:
        The unconditional conditioning, ``batch_size`` long.
    """
    empty = encode_prompts(pipe, [""], grad=grad)
    if detect_family(pipe) is ModelFamily.SDXL and pipe.config.get("force_zeros_for_empty_prompt", False):
        empty = Conditioning(
            torch.zeros_like(empty.prompt_embeds), torch.zeros_like(empty.pooled_prompt_embeds), empty.add_time_ids
        )
    return empty.expand(batch_size)


def _timestep_batch(timesteps: int | float | Tensor, batch_size: int, device: torch.device) -> Tensor:
    if not isinstance(timesteps, Tensor):
        timesteps = torch.tensor(timesteps, dtype=torch.long if isinstance(timesteps, int) else torch.float32)
    timesteps = timesteps.to(device)
    if timesteps.ndim == 0 or timesteps.numel() == 1:
        return timesteps.reshape(1).expand(batch_size)
    if timesteps.ndim == 1 and timesteps.shape[0] == batch_size:
        return timesteps
    raise ValueError(
        f"timesteps has shape {tuple(timesteps.shape)}; pass one timestep or one per latent ({batch_size})."
    )


def predict_noise(
    pipe: DiffusionPipeline,
    latents: Tensor,
    timesteps: int | Tensor,
    conditioning: Conditioning,
    guidance_scale: float | None = None,
    unconditional: Conditioning | None = None,
) -> Tensor:
    """Run the UNet on noisy latents, optionally with classifier-free guidance.

    With ``guidance_scale = g`` the unconditional and conditional halves go through the UNet in one batched
    forward and the result is ``out_uncond + g * (out_cond - out_uncond)``. Gradients flow when enabled.

    The output is in the model's own parameterisation (noise for ``epsilon`` models, ``v`` for ``v_prediction``
    models; see :func:`prediction_type`). Latents are used as given: apply ``scheduler.scale_model_input`` first
    for schedulers that need it (DDIM does not).

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        latents: ``[B, C, h, w]`` noisy latents.
        timesteps: An int, a 0-d tensor, or a 1-d tensor of 1 or ``B`` timesteps.
        conditioning: ``B`` prompts, or 1 prompt used for every latent.
        guidance_scale: CFG scale; ``None`` for the plain conditional prediction.
        unconditional: Unconditional conditioning (1 or ``B`` prompts); the pipeline's default
            (:func:`unconditional_conditioning`) when not given.

    Returns:
        ``[B, C, h, w]`` UNet output.
    """
    batch_size = latents.shape[0]
    t = _timestep_batch(timesteps, batch_size, latents.device)
    cond = conditioning.to(latents.device, latents.dtype).expand(batch_size)
    if guidance_scale is None:
        return pipe.unet(latents, t, **cond.unet_kwargs(), return_dict=False)[0]
    if unconditional is None:
        unconditional = unconditional_conditioning(pipe)
    uncond = unconditional.to(latents.device, latents.dtype).expand(batch_size)
    both = Conditioning.cat([uncond, cond])
    output = pipe.unet(torch.cat([latents, latents]), torch.cat([t, t]), **both.unet_kwargs(), return_dict=False)[0]
    out_uncond, out_cond = output.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


# --------------------------------------------------------------------------------------------------------------
# Single-file (original LDM layout) export
# --------------------------------------------------------------------------------------------------------------

_UNET_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION_RENAMES = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _rename_with(prefixes: dict[str, tuple[str, tuple[tuple[str, str], ...]]], key: str) -> str:
    """Map a diffusers key through the longest matching prefix, renaming the rest with its inner table."""
    best = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise ValueError(f"No single-file name for '{key}': this layout is not supported for export.")
    target, inner = prefixes[best]
    rest = key[len(best) + 1 :]
    for old, new in inner:
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"{target}.{rest}"


def _unet_to_ldm(unet: torch.nn.Module) -> dict[str, Tensor]:
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("Single-file export needs an int layers_per_block.")
    stride = layers + 1
    plain: tuple[tuple[str, str], ...] = ()
    prefixes: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
        "time_embedding.linear_1": ("time_embed.0", plain),
        "time_embedding.linear_2": ("time_embed.2", plain),
        "conv_in": ("input_blocks.0.0", plain),
        "conv_norm_out": ("out.0", plain),
        "conv_out": ("out.2", plain),
        "add_embedding.linear_1": ("label_emb.0.0", plain),
        "add_embedding.linear_2": ("label_emb.0.2", plain),
    }
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{1 + i * stride + j}.0", _UNET_RESNET_RENAMES)
        for j in range(len(getattr(block, "attentions", None) or ())):
            prefixes[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{1 + i * stride + j}.1", plain)
        if block.downsamplers:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * stride}.0.op", plain)
    if unet.mid_block is not None:
        prefixes["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET_RENAMES)
        prefixes["mid_block.attentions.0"] = ("middle_block.1", plain)
        prefixes["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET_RENAMES)
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{i * stride + j}.0", _UNET_RESNET_RENAMES)
        for j in range(len(attentions)):
            prefixes[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{i * stride + j}.1", plain)
        if block.upsamplers:
            slot = 2 if attentions else 1
            prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{i * stride + layers}.{slot}.conv", plain)
    return {_rename_with(prefixes, key): value for key, value in unet.state_dict().items()}


def _vae_to_ldm(vae: torch.nn.Module) -> dict[str, Tensor]:
    plain: tuple[tuple[str, str], ...] = ()
    resnet = (("conv_shortcut", "nin_shortcut"),)
    prefixes: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
        "quant_conv": ("quant_conv", plain),
        "post_quant_conv": ("post_quant_conv", plain),
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in"] = (f"{part}.conv_in", plain)
        prefixes[f"{part}.conv_out"] = (f"{part}.conv_out", plain)
        prefixes[f"{part}.conv_norm_out"] = (f"{part}.norm_out", plain)
        prefixes[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION_RENAMES)
        for k in range(2):
            prefixes[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", resnet)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", resnet)
        if block.downsamplers:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", plain)
    count = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{count - 1 - i}.block.{j}", resnet)
        if block.upsamplers:
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{count - 1 - i}.upsample.conv", plain)
    converted = {}
    for key, value in vae.state_dict().items():
        name = _rename_with(prefixes, key)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        converted[name] = value
    return converted


def _hf_clip_keys(text_encoder: torch.nn.Module) -> dict[str, Tensor]:
    """HF CLIP text weights keyed ``text_model.*`` (transformers >= 5.6 drops that prefix on CLIPTextModel)."""
    state = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        state[key] = value
    return state


def _clip_to_open_clip(text_encoder: torch.nn.Module) -> dict[str, Tensor]:
    """Inverse of diffusers' ``convert_open_clip_checkpoint``: HF CLIP text weights in OpenCLIP names."""
    state = _hf_clip_keys(text_encoder)
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in fixed:
            converted[fixed[key]] = value
        elif key == "text_projection.weight":
            converted["text_projection"] = value.T.contiguous()
        elif not key.startswith("text_model.encoder.layers."):
            raise ValueError(f"No OpenCLIP name for '{key}'.")
    for index in range(text_encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            projections = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            converted[f"{dst}attn.in_proj_{kind}"] = torch.cat(projections, dim=0)
            converted[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            converted[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            converted[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            converted[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            converted[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return converted


def single_file_state_dict(pipe: DiffusionPipeline) -> dict[str, Tensor]:
    """The pipeline's weights in the original (LDM / SGM) single-file layout.

    SD 1.x keeps the HF CLIP text encoder (``cond_stage_model.transformer.*``), SD 2.x writes it in OpenCLIP names
    (``cond_stage_model.model.*``), SDXL writes ``conditioner.embedders.0.transformer.*`` and
    ``conditioner.embedders.1.model.*``. The result loads back with ``from_single_file`` (and
    :func:`load_pipeline`).

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.

    Returns:
        A flat state dict of CPU tensors.
    """
    family = detect_family(pipe)
    state = {f"model.diffusion_model.{k}": v for k, v in _unet_to_ldm(pipe.unet).items()}
    state |= {f"first_stage_model.{k}": v for k, v in _vae_to_ldm(pipe.vae).items()}
    if family is ModelFamily.SD1:
        state |= {f"cond_stage_model.transformer.{k}": v for k, v in _hf_clip_keys(pipe.text_encoder).items()}
    elif family is ModelFamily.SD2:
        state |= {f"cond_stage_model.model.{k}": v for k, v in _clip_to_open_clip(pipe.text_encoder).items()}
    else:
        embedder_0 = _hf_clip_keys(pipe.text_encoder)
        state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in embedder_0.items()}
        embedder_1 = _clip_to_open_clip(pipe.text_encoder_2)
        state |= {f"conditioner.embedders.1.model.{k}": v for k, v in embedder_1.items()}
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def save_single_file(pipe: DiffusionPipeline, path: str | Path) -> Path:
    """Write :func:`single_file_state_dict` to a ``.safetensors`` file.

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        path: Destination; must end in ``.safetensors``.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} must end in .safetensors.")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(single_file_state_dict(pipe), str(path), metadata={"format": "pt"})
    return path
