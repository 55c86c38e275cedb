"""The common work of every erasure method: the :meth:`EraseMethod.apply` template and parameter presets.

A method is a :class:`MethodConfig` subclass plus an :class:`EraseMethod` subclass that implements one hook,
:meth:`EraseMethod._erase`, which changes the selected parameters in place. :meth:`EraseMethod.apply` does the rest:
family check, hiding the held-out prompts, tokenizer checks, parameter selection, snapshot, seeding, NaN check,
diffing into an :class:`~erasure.edit.Edit`, and restoring the pipeline, so ``apply`` never leaves the pipeline
changed: the caller applies the returned edit.

Parameter presets (keys ``unet.<diffusers parameter name>``):

* ``xattn``: every cross-attention (``attn2``) parameter (ESD-x, Gandikota et al. 2023);
* ``xattn_kv``: the cross-attention key and value projection weights (UCE, MACE);
* ``noxattn``: every UNet parameter except cross-attention, the time (and SDXL added) embeddings and the output
  layers, as ESD-u's ``noxattn`` in the official ESD code;
* ``unet``: every UNet parameter;
* ``text_encoder``: every parameter of the text encoder(s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from erasure.concepts import EraseRequest, check_encodable
from erasure.edit import Edit, fingerprint
from erasure.expansion import TEMPLATE_SETS, expand_request, resolve_templates
from erasure.pipeline import ModelFamily, detect_family
from erasure.suppression import GenerationEdit

logger = logging.getLogger(__name__)

__all__ = [
    "PARAMETER_PRESETS",
    "EraseMethod",
    "GenerationTimeMethod",
    "MethodConfig",
    "NonFiniteEditError",
    "images_by_concept",
    "optimiser_step",
    "pipeline_tokenizers",
    "preset_parameters",
    "select_unet_parameters",
]

PARAMETER_PRESETS: dict[str, str] = {
    "xattn": "every cross-attention (attn2) parameter",
    "xattn_kv": "cross-attention key and value projection weights (attn2.to_k, attn2.to_v)",
    "noxattn": "every UNet parameter except cross-attention, time/added embeddings and output layers (ESD-u)",
    "unet": "every UNet parameter",
    "text_encoder": "every text encoder parameter",
}
_NOXATTN_EXCLUDED_PREFIXES = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")


class NonFiniteEditError(RuntimeError):
    """A method produced NaN or infinite weights; the pipeline was restored."""


def _is_cross_attention(name: str) -> bool:
    return ".attn2." in f".{name}"


def select_unet_parameters(unet: torch.nn.Module, preset: str) -> dict[str, torch.nn.Parameter]:
    """UNet parameters of a preset (see the module docstring), keyed ``unet.<name>``.

    Args:
        unet: A diffusers ``UNet2DConditionModel``.
        preset: ``xattn``, ``xattn_kv``, ``noxattn`` or ``unet``.

    Returns:
        The selected parameters (the live ``nn.Parameter`` objects), in module order.

    Raises:
        ValueError: On an unknown preset.
    """
    if preset not in PARAMETER_PRESETS or preset == "text_encoder":
        raise ValueError(f"Unknown UNet parameter preset {preset!r}; choose from xattn, xattn_kv, noxattn, unet.")
    selected = {}
    for name, parameter in unet.named_parameters():
        if preset == "xattn":
            keep = _is_cross_attention(name)
        elif preset == "xattn_kv":
            keep = _is_cross_attention(name) and name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
        elif preset == "noxattn":
            keep = not _is_cross_attention(name) and not name.startswith(_NOXATTN_EXCLUDED_PREFIXES)
        else:
            keep = True
        if keep:
            selected[f"unet.{name}"] = parameter
    return selected


def preset_parameters(pipe: DiffusionPipeline, preset: str) -> dict[str, torch.nn.Parameter]:
    """Parameters of a preset in a whole pipeline: the UNet presets, or ``text_encoder`` (both encoders in SDXL)."""
    if preset == "text_encoder":
        selected = {}
        for component in ("text_encoder", "text_encoder_2"):
            module = getattr(pipe, component, None)
            if module is not None:
                selected |= {f"{component}.{name}": p for name, p in module.named_parameters()}
        return selected
    return select_unet_parameters(pipe.unet, preset)


def images_by_concept(request: EraseRequest, images: Any) -> dict[str, Any]:
    """The ``images`` a user gave a method, as ``{concept name: images}`` (``{}`` when none were given).

    Args:
        request: The request the images are for.
        images: ``None``; a list of images (PIL images or ``[H, W, 3]`` arrays) or an ``[N, H, W, 3]`` array, for
            a single-concept request; or ``{concept name: images}`` naming every concept
            (:func:`erasure.files.load_training_images` reads a folder into either form).

    Raises:
        ValueError: A multi-concept request without a dict, a dict missing a concept, or not images at all.
    """
    if images is None:
        return {}
    if isinstance(images, Mapping):
        missing = [c.name for c in request.concepts if c.name not in images]
        if missing:
            raise ValueError(f"images has no entry for concept(s) {', '.join(missing)}; give images for each.")
        return dict(images)
    if len(request.concepts) > 1:
        raise ValueError(
            "With several concepts, pass images as a dict {concept name: images} (a folder with one subfolder per "
            "concept), so each image is used with its own concept."
        )
    if isinstance(images, str | bytes) or not isinstance(images, Sequence | np.ndarray):
        raise ValueError("images must be a list of PIL images or arrays (the CLI loads --images DIR).")
    return {request.concepts[0].name: images}


def pipeline_tokenizers(pipe: DiffusionPipeline) -> list[Any]:
    """The pipeline's tokenizers (two for SDXL)."""
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


@contextlib.contextmanager
def gradient_checkpointing(unet: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Turn on the UNet's gradient checkpointing while the block runs (if ``enabled`` and not on already)."""
    switch = enabled and not unet.is_gradient_checkpointing
    if switch:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if switch:
            unet.disable_gradient_checkpointing()


def optimiser_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    parameters: list[Tensor],
    *,
    max_grad_norm: float,
    label: str,
    step: int,
    lr: float,
) -> float:
    """One training step of a fine-tuning method: refuse a non-finite loss, backward, clip, step; returns the loss.

    Raises:
        NonFiniteEditError: ``loss`` is NaN or infinite (the message names ``label``, the step and the lr; the
            pipeline is restored by :meth:`EraseMethod.apply`).
    """
    if not torch.isfinite(loss):
        raise NonFiniteEditError(
            f"{label} loss became {loss.item()} at step {step}; lower lr (now {lr:g}). The pipeline was restored."
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    return loss.item()


@dataclass
class MethodConfig:
    """Settings of a method. Subclasses add fields with ``metadata={"help": ...}`` and validate in ``__post_init__``.

    The fields are the method's command-line options (``erasure erase <method> --help``) and are saved in the edit.
    """

    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    expand: str = field(
        default="auto",
        metadata={
            "help": "expand a concept with fewer than 3 erase prompts into templated phrasings: auto (toyworld for "
            "the toy tokenizer, else sd), sd, toyworld or off (erasure.expansion)"
        },
    )

    #: Old option name -> current name. Edit configs written before a rename still load and replay; the command
    #: line accepts the old spelling as a hidden alias.
    renamed_options: ClassVar[dict[str, str]] = {}

    def check_expand(self) -> None:
        """Raise a ``ValueError`` naming ``expand`` unless it is one of :data:`erasure.expansion.TEMPLATE_SETS`."""
        if self.expand not in TEMPLATE_SETS:
            raise ValueError(f"expand must be one of {', '.join(TEMPLATE_SETS)}, got {self.expand!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-friendly dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build from a dict, old option names mapped to new; unknown keys raise a ``ValueError`` naming the known."""
        data = {cls.renamed_options.get(key, key): value for key, value in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        return cls(**data)


@contextlib.contextmanager
def _preserved_module_state(pipe: DiffusionPipeline) -> Iterator[None]:
    """Restore every component's ``requires_grad`` flags, absent gradients and train/eval modes on exit."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    flags = [(p, p.requires_grad, p.grad is None) for m in modules for p in m.parameters()]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        yield
    finally:
        for parameter, flag, had_no_grad in flags:
            parameter.requires_grad_(flag)
            if had_no_grad:
                parameter.grad = None  # free what training left behind
        for module, training in modes:
            module.training = training


class EraseMethod:
    """Base class of erasure methods: subclasses set ``name``/``config_class`` and implement :meth:`_erase`.

    Attributes:
        name: The registry name (set per instance by :func:`erasure.methods.get_method` for presets).
        config_class: The method's :class:`MethodConfig` subclass.
        supported_families: Model families the method handles.
        parameter_preset: Default parameter selection (see :data:`PARAMETER_PRESETS`).
        needs_vae: Whether the method samples or decodes images; the command line loads the pipeline without its
            VAE for one that does not (a closed-form edit).
        config: This instance's settings.
    """

    name: ClassVar[str] = "base"
    #: True for methods that change how images are sampled and no weight (:class:`GenerationTimeMethod`).
    generation_time: ClassVar[bool] = False
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    supported_families: ClassVar[tuple[ModelFamily, ...]] = (ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SDXL)
    parameter_preset: ClassVar[str] = "xattn"
    needs_vae: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None) -> None:
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}."
            )
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config})"

    @classmethod
    def test_config(cls) -> dict[str, Any]:
        """Config overrides that make the method fast enough for the tiny test pipelines (e.g. few iterations)."""
        return {}

    def select_parameters(self, pipe: DiffusionPipeline) -> dict[str, torch.nn.Parameter]:
        """The parameters the method may change, keyed ``unet.<name>`` / ``text_encoder.<name>``."""
        return preset_parameters(pipe, self.parameter_preset)

    def _erase(
        self,
        pipe: DiffusionPipeline,
        request: EraseRequest,
        parameters: dict[str, torch.nn.Parameter],
        *,
        images: Any = None,
        progress: bool = True,
        originals: dict[str, Tensor] | None = None,
    ) -> dict[str, Any]:
        """The method's hook: change ``parameters`` in place to erase ``request``'s concepts.

        Args:
            pipe: The pipeline (its weights are restored by :meth:`apply` afterwards).
            request: The request without held-out prompts.
            parameters: The selected parameters, to modify in place.
            images: Optional images of the concepts, for methods that use them.
            progress: Show a progress bar.
            originals: :meth:`apply`'s snapshot of ``parameters`` before the hook runs (same keys, on the CPU). A
                hook that needs the original values (ESD's frozen predictions) may borrow these tensors instead of
                cloning its own, and may even swap values in and out of them, provided that every tensor holds its
                original value again when the hook returns or raises: :meth:`apply` restores the pipeline from them.

        Returns:
            JSON-friendly statistics (losses, residuals) stored in the edit.
        """
        raise NotImplementedError

    def _prepare(
        self, pipe: DiffusionPipeline, request: EraseRequest
    ) -> tuple[ModelFamily, EraseRequest, EraseRequest]:
        """Check the family, expand the request and check it against the tokenizers.

        Returns ``(family, request, method_request)``: the expanded request (the one the edit records) and the view
        the method gets (held-out prompts removed).

        Raises:
            ValueError: Unsupported family, an unknown ``expand``, or a concept the tokenizer cannot encode.
        """
        family = detect_family(pipe)
        if family not in self.supported_families:
            supported = ", ".join(str(f) for f in self.supported_families)
            raise ValueError(f"Method '{self.name}' does not support {family} pipelines (supported: {supported}).")
        self.config.check_expand()
        request = expand_request(request, resolve_templates(self.config.expand, pipeline_tokenizers(pipe)))
        method_request = request.for_method()
        for tokenizer in pipeline_tokenizers(pipe):
            check_encodable(tokenizer, method_request)
        return family, request, method_request

    def apply(
        self,
        pipe: DiffusionPipeline,
        request: EraseRequest,
        *,
        images: Any = None,
        progress: bool = True,
        base_model: str = "",
    ) -> Edit:
        """Erase ``request``'s concepts and return the change as an :class:`~erasure.edit.Edit`.

        The pipeline's weights, ``requires_grad`` flags and train/eval modes are the same after the call as
        before it (also when the method fails); apply the returned edit with ``edit.apply_to(pipe)``.

        Args:
            pipe: A Stable Diffusion pipeline of a supported family.
            request: What to erase. Concepts with few erase prompts are first expanded into templated phrasings
                (the config's ``expand``, :mod:`erasure.expansion`; the edit records the expanded request); the
                held-out ``evaluate`` prompts are removed before the method sees it.
            images: Optional images for methods that use them.
            progress: Show progress bars.
            base_model: Name of the base model, recorded in the edit.

        Returns:
            The edit: deltas of the tensors that changed, and metadata.

        Raises:
            ValueError: Unsupported family, a concept the tokenizer cannot encode, or nothing selected.
            NonFiniteEditError: The method produced NaN/inf weights.
        """
        family, request, method_request = self._prepare(pipe, request)
        parameters = self.select_parameters(pipe)
        if not parameters:
            raise ValueError(f"Method '{self.name}' selected no parameters in this pipeline.")
        # the snapshot lives on the CPU: on a GPU it would double the memory of large selections (ESD-u)
        originals = {key: parameter.detach().to("cpu", copy=True) for key, parameter in parameters.items()}
        device = next(iter(parameters.values())).device
        rng_devices = [device] if device.type == "cuda" else []
        try:
            with _preserved_module_state(pipe), torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(self.config.seed)
                stats = self._erase(
                    pipe, method_request, parameters, images=images, progress=progress, originals=originals
                )
            bad = [key for key, p in parameters.items() if not torch.isfinite(p.detach()).all()]
            if bad:
                raise NonFiniteEditError(
                    f"Method '{self.name}' produced non-finite weights in {len(bad)} tensor(s) (first: {bad[0]}); "
                    "lower the learning rate or raise the regularisation. The pipeline was restored."
                )
            deltas = {}
            for key, parameter in parameters.items():
                current = parameter.detach().to("cpu")
                if not torch.equal(current, originals[key]):
                    deltas[key] = current.float() - originals[key].float()
        finally:
            with torch.no_grad():
                for key, parameter in parameters.items():
                    parameter.copy_(originals[key])
        if not deltas:
            logger.warning("Method '%s' changed no weights.", self.name)
        config = {
            "method": self.name,
            "method_config": self.config.to_dict(),
            "request": request.to_dict(),
            "base_model": str(base_model),
            "family": str(family),
            "base_fingerprint": fingerprint({key: originals[key] for key in deltas}),
            "stats": stats or {},
        }
        return Edit(deltas, config)


class GenerationTimeMethod(EraseMethod):
    """Base class of methods that suppress a concept while sampling (a negative prompt, SLD) and change no weight.

    :meth:`apply` checks the family and the request as for a weight method, then returns the subclass's
    :class:`~erasure.suppression.GenerationEdit`, whose config records what it will do (``suppression``), so
    loading the folder rebuilds the same edit without the pipeline.

    Attributes:
        edit_class: The :class:`~erasure.suppression.GenerationEdit` subclass this method returns.
    """

    generation_time: ClassVar[bool] = True
    needs_vae: ClassVar[bool] = False  # apply only records what sampling will do
    edit_class: ClassVar[type[GenerationEdit]] = GenerationEdit

    def suppression(self, pipe: DiffusionPipeline, request: EraseRequest) -> dict[str, Any]:
        """What the edit does at generation time (JSON-friendly); stored as ``config["suppression"]``."""
        raise NotImplementedError

    def select_parameters(self, pipe: DiffusionPipeline) -> dict[str, torch.nn.Parameter]:
        """None: a generation-time method changes no weight."""
        return {}

    def apply(
        self,
        pipe: DiffusionPipeline,
        request: EraseRequest,
        *,
        images: Any = None,
        progress: bool = True,
        base_model: str = "",
    ) -> GenerationEdit:
        """The generation-time edit for ``request`` (arguments as :meth:`EraseMethod.apply`); ``pipe`` is only read.

        Raises:
            ValueError: Unsupported family, or a concept the tokenizer cannot encode.
        """
        family, request, method_request = self._prepare(pipe, request)
        config = {
            "method": self.name,
            "method_config": self.config.to_dict(),
            "request": request.to_dict(),
            "base_model": str(base_model),
            "family": str(family),
            "suppression": self.suppression(pipe, method_request),
            "stats": {},
        }
        return self.edit_class(config)
