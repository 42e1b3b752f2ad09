"""The toy's training loss with the network in C, swapped in for the trainer's plain loss once proven.

`proven_loss` returns the loss, or None and why not. On the CPU, for a DiT with few tokens (the
toy), the whole DiT forward, DiT's hybrid loss and the whole backward run in hand-written C, a tile of
samples at a time (fused_dit.fused_hybrid_loss); with another loss the network runs in C under
`diffusion.training_losses` (fused_dit.fused_model). The trainer's step does the rest (backward, gradient
mean over ranks, optimizer step and EMA) for either loss. Before it is returned, fast/proof.py
checks its loss and gradients against `diffusion.training_losses` with the model as it is in memory.
"""

import torch

from .fused_dit import (
    DiTPlan,
    c_kernels,
    fused_hybrid_loss,
    fused_model,
    hybrid_loss_supported,
    keep_freed_memory,
)
from .proof import check_batch, check_loss
from .speed import choose, describe, key_of


def make_optimizer(params, lr: float, weight_decay: float = 0.0):
    """AdamW of the DiT recipe (constant lr, no weight decay unless asked) with PyTorch's fused kernel: the
    same update rule in one pass over every parameter, instead of a loop of foreach ops (ToyDiT/1 on the
    2-core CPU: 0.6 ms instead of 2.6 ms per step)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _mean_loss(diffusion, model_fn):
    """loss(x_start, t, noise, y) -> the batch mean of diffusion.training_losses with model_fn."""
    def loss(x_start, t, noise, y):
        losses = diffusion.training_losses(model_fn, x_start, t, model_kwargs={"y": y}, noise=noise)
        return losses["loss"].mean()
    return loss


def proven_loss(model, diffusion, batch_size=None):
    """(loss, None), or (None, why not in one line) when no fast loss fits or proves itself.

    loss(x_start, t, noise, y) -> the batch mean of DiT's training loss (0-dim, differentiable), with the
    network in C; loss.path names the kernels ("tiled-cpu"). No class dropout: y as given. The trainer
    wraps it in its step (backward, gradient mean over ranks, optimizer, EMA). batch_size: the batch the
    step will take; given, the fast loss must also be faster than the plain one on it (fast/speed.py,
    timed once per CPU, model, batch and thread count), and loss.timing holds both times (a refusal's
    reason says them). Proving it calls kernels.keep_freed_memory(), a process-wide glibc setting (freed
    memory stays in the heap instead of being faulted in again at every step; docs/performance.md)."""
    reason = DiTPlan(model).reason
    kernels = c_kernels() if reason is None else None
    if reason is None and kernels is None:
        reason = "the C kernels did not build or load here (the warning says why)"
    if reason is not None:
        return None, reason
    hybrid = hybrid_loss_supported(diffusion) is None

    def fast_loss(m):
        if hybrid:
            return fused_hybrid_loss(m, diffusion, DiTPlan(m), kernels)
        return _mean_loss(diffusion, fused_model(m, DiTPlan(m), kernels))

    reason = check_loss(fast_loss, lambda m: _mean_loss(diffusion, m), model, diffusion)
    if reason is not None:
        return None, reason
    keep_freed_memory()
    loss = fast_loss(model)
    loss.path, loss.timing = kernels.name, None
    if batch_size:
        loss.timing = _timing(model, diffusion, loss, kernels, batch_size, hybrid)
        if loss.timing["choice"] != "fast":
            return None, "not clearly faster here: " + describe(loss.timing, "step (loss and gradients)")
    return loss, None


def _timing(model, diffusion, fast_loss, kernels, batch_size, hybrid):
    """fast/speed.py's record of fast_loss against the plain loss, each with every gradient, on a batch of
    batch_size drawn as fast/proof.py draws its check batch; nothing is written to the parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = check_batch(model, diffusion, batch=batch_size)
    plain_loss = _mean_loss(diffusion, model)

    def run(loss):
        return lambda: torch.autograd.grad(loss(*inputs), params, allow_unused=True)

    key = key_of("train", kernels, model, batch=batch_size, hybrid=hybrid,
                 diffusion=[diffusion.num_timesteps, diffusion.loss_type])
    return choose(key, run(fast_loss), run(plain_loss))
