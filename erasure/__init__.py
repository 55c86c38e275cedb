"""erasure: concept erasure for text-to-image diffusion models.

Erase a concept from a Stable Diffusion model with one command, evaluate any erased checkpoint with a CLIP-based
evaluator, and compare models side by side. See README.md.
"""

__version__ = "0.1.0"
