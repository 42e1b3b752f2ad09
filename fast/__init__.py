"""The speed paths of the toy study, behind three functions; nothing outside fast/ reaches further in.

- proven_train_step(model, ema, diffusion, optimizer, ema_decay=..., world_size=...) -> (step or None,
  reason): the toy's training step with the network in C, for the trainer to swap in for its plain step.
- make_optimizer(params, lr): the DiT recipe's AdamW with PyTorch's fused kernel.
- sample_toy(model, diffusion, num_samples, ...): ancestral sampling of the toy models.

Each fast path is checked against models.py and diffusion/ as they are in memory before it is used
(fast/proof.py); where the check fails, the plain code runs and the log says why. Imports go one way:
fast/ imports models, diffusion and ditnorm.averaging, never the reverse.
"""

from .sampler import sample_toy
from .train_step import make_optimizer, proven_train_step

__all__ = ["make_optimizer", "proven_train_step", "sample_toy"]
