"""The speed paths of the toy study, behind three functions; nothing outside fast/ reaches further in.

- proven_loss(model, diffusion) -> (loss or None, reason): the toy's training loss with the network in C,
  for the trainer's step to take instead of its plain loss.
- make_optimizer(params, lr): the DiT recipe's AdamW with PyTorch's fused kernel.
- sample_toy(model, diffusion, num_samples, ...): ancestral sampling of the toy models.

Each fast path is checked against models.py and diffusion/ as they are in memory before it is used
(fast/proof.py); where the check fails, the plain code runs and the log says why. Imports go one way:
fast/ imports models and diffusion, never the reverse.
"""

from .sampler import sample_toy
from .train_step import make_optimizer, proven_loss

__all__ = ["make_optimizer", "proven_loss", "sample_toy"]
