"""The toy world: a synthetic dataset, its spec renderer, and training of its SD pipeline, CLIP and oracle."""
