"""The speed paths of the toy study, behind four functions; nothing outside fast/ reaches further in.

- proven_loss(model, diffusion, batch_size) -> (loss or None, reason): the toy's training loss with the
  network in C, for the trainer's step to take instead of its plain loss.
- make_optimizer(params, lr): the DiT recipe's AdamW with PyTorch's fused kernel.
- sample_toy(model, diffusion, num_samples, ...): ancestral sampling of the toy models.
- describe_timing(timing, unit): the one-line account of a fast path timed against the plain one.

Each fast path is checked against models.py and diffusion/ as they are in memory before it is used
(fast/proof.py) and timed against it on the batch used (fast/speed.py); where the check fails or the
fast path is not clearly faster, the plain code runs and the log says why. Imports go one way:
fast/ imports models and diffusion, never the reverse.
"""

from .sampler import sample_toy
from .speed import describe as describe_timing
from .train_step import make_optimizer, proven_loss

__all__ = ["describe_timing", "make_optimizer", "proven_loss", "sample_toy"]
