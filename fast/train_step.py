"""The toy's training step with the network in C, swapped in for the trainer's plain step once proven.

`proven_train_step` returns the step, or None and why not. On the CPU, for a DiT with few tokens (the
toy), the whole DiT forward, DiT's hybrid loss and the whole backward run in hand-written C, a tile of
samples at a time (fused_dit.fused_hybrid_loss); with another loss the network runs in C under
`diffusion.training_losses` (fused_dit.fused_model). The rest of the step is the plain step's: gradient
mean over ranks, optimizer step and EMA, from ditnorm.averaging. Before it is returned, fast/proof.py
checks its loss and gradients against `diffusion.training_losses` with the model as it is in memory.
"""

import torch

from ditnorm.averaging import all_reduce_mean, update_ema

from .fused_dit import (
    DiTPlan,
    c_kernels,
    fused_hybrid_loss,
    fused_model,
    hybrid_loss_supported,
    keep_freed_memory,
)
from .proof import check_loss


def make_optimizer(params, lr: float):
    """AdamW of the DiT recipe (constant lr, no weight decay) with PyTorch's fused kernel: the same update
    rule in one pass over every parameter, instead of a loop of foreach ops (ToyDiT/1 on the 2-core CPU:
    0.6 ms instead of 2.6 ms per step)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0, fused=True)


def _mean_loss(diffusion, model_fn):
    """loss(x_start, t, noise, y) -> the batch mean of diffusion.training_losses with model_fn."""
    def loss(x_start, t, noise, y):
        losses = diffusion.training_losses(model_fn, x_start, t, model_kwargs={"y": y}, noise=noise)
        return losses["loss"].mean()
    return loss


def proven_train_step(model, ema, diffusion, optimizer, *, ema_decay: float, world_size: int = 1):
    """(step, None), or (None, why not in one line) when no fast step fits or proves itself.

    step(x_start, t, noise, y) -> the local mean loss (0-dim, detached), after the backward, the gradient
    mean over ranks (world_size > 1), optimizer.step() and the EMA update of `ema` (a copy of model);
    step.path names the kernels ("tiled-cpu") and step.fast_reason is None. No class dropout: y as given.
    Taking the step calls kernels.keep_freed_memory(), a process-wide glibc setting (freed memory stays in
    the heap instead of being faulted in again at every step; docs/performance.md)."""
    reason = DiTPlan(model).reason
    kernels = c_kernels() if reason is None else None
    if reason is None and kernels is None:
        reason = "no C compiler here (the C kernels did not build)"
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
    loss_fn = fast_loss(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x_start, t, noise, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x_start, t, noise, y)
        loss.backward()
        if world_size > 1:
            for p in params:
                if p.grad is None:  # every rank must send the same buffer layout
                    p.grad = torch.zeros_like(p)
            all_reduce_mean([p.grad for p in params], world_size)
        optimizer.step()
        update_ema(list(ema.parameters()), list(model.parameters()), ema_decay)
        return loss.detach()

    step.path, step.fast_reason = kernels.name, None
    return step, None
