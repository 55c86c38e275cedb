"""erasure: concept erasure for text-to-image diffusion models — erase, evaluate, compare."""

import os

# Our machines (and many users') have 2 cores shared between jobs. OpenMP's default busy-waiting then makes every
# torch op wait on spinning threads, which slows a shared machine by an order of magnitude.
# Passive waiting costs little on an idle machine. Set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
