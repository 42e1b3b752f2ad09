"""Every fast path of the repository, behind three functions; nothing outside fast/ reaches further in.

- make_train_step(model, ema, diffusion, optimizer, ema_decay=..., world_size=..., fast="auto"): the whole
  optimisation step; on the CPU the toy's network runs in hand-written C (fused_dit.c), on CUDA the step
  is captured in CUDA graphs.
- make_optimizer(params, lr): the DiT recipe's AdamW with PyTorch's fused kernel.
- sample_toy(model, diffusion, num_samples, ...): ancestral sampling of the toy models.

Each fast path is checked against models.py and diffusion/ as they are in memory before it is used
(fast/proof.py); where the check fails, the plain code runs and the log says why. Imports go one way:
fast/ imports models and diffusion, never the reverse.
"""

from .sampler import sample_toy
from .train_step import FAST_CHOICES, compile_options, make_optimizer, make_train_step

__all__ = ["FAST_CHOICES", "compile_options", "make_optimizer", "make_train_step", "sample_toy"]
