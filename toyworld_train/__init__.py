"""Training of the toy world's models (oracle, VAE, UNet + text encoder, CLIP); see :mod:`toyworld_train.train`."""
