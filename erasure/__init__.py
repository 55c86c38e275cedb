"""erasure: concept erasure for text-to-image diffusion models — erase, evaluate, compare.

The Python API mirrors the command line; every name below is imported on first use, so ``import erasure`` stays
cheap (no torch until a model is touched)::

    import erasure

    pipe = erasure.load_pipeline("CompVis/stable-diffusion-v1-4")
    request = erasure.load_concepts("prompts/sd/styles/van_gogh.toml")
    edit = erasure.get_method("uce").apply(pipe, request)          # an Edit: deltas of the touched tensors
    edit.save("runs/van-gogh")
    images = erasure.generate_paired(pipe, {"uce": edit}, ["a painting by Van Gogh"], [0])
    rows, source, per_row = erasure.prompt_rows(concept="prompts/sd/styles/van_gogh.toml", seeds_per_prompt=5)
    erasure.run_evaluation("runs/eval", model="CompVis/stable-diffusion-v1-4", edits=["runs/van-gogh"],
                           rows=rows, prompt_source=source, images_per_row=per_row)
    erasure.write_report(["runs/eval"], "runs/report.html")
"""

import importlib
import os

# Our machines (and many users') have 2 cores shared between jobs. OpenMP's default busy-waiting then makes every
# torch op wait on spinning threads, which slows a shared machine by an order of magnitude.
# Passive waiting costs little on an idle machine. Set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: Public name -> the module that defines it. (``generate`` itself is ``erasure.generate.generate``: a package
#: attribute cannot be both the module and its function.)
_EXPORTS = {
    "load_pipeline": "erasure.pipeline",
    "detect_family": "erasure.pipeline",
    "load_concepts": "erasure.concepts",
    "request_from_prompts": "erasure.concepts",
    "EraseRequest": "erasure.concepts",
    "Concept": "erasure.concepts",
    "load_prompt_csv": "erasure.prompt_sets",
    "get_method": "erasure.methods",
    "method_names": "erasure.methods",
    "load_edit": "erasure.methods",
    "replay": "erasure.methods",
    "Edit": "erasure.edit",
    "stack": "erasure.edit",
    "generate_paired": "erasure.generate",
    "run_evaluation": "erasure.evaluation",
    "prompt_rows": "erasure.evaluation",
    "run_sweep": "erasure.evaluation",
    "Evaluator": "erasure.evaluation",
    "load_clip": "erasure.evaluation",
    "export_edit": "erasure.export",
    "make_grid": "erasure.comparison",
    "write_report": "erasure.report",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'erasure' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
