"""Channel ablations of one block's output that separate what the channels carry from what their size does
to the norms downstream (docs/instruments.md): zero them, put their training mean in their place, or zero
them while every later norm keeps the statistics of its input as it was ("stats"); each against
count-matched random channels, chosen on training images and measured on held-out ones."""

import contextlib

import numpy as np
import torch
import torch.nn as nn

from ditnorm import image_metrics as metrics

MODES = ("zero", "mean", "stats")


def _frozen_norm(norm, x, reference):
    """norm(x) computed with the statistics of `reference` (x with the removed values put back)."""
    if isinstance(norm, nn.LayerNorm):
        mean = reference.mean(dim=-1, keepdim=True)
        variance = reference.var(dim=-1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(variance + norm.eps)
    if isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(reference.pow(2).mean(dim=-1, keepdim=True) + eps)
    return None  # elementwise (DyT) or none: nothing to freeze


@contextlib.contextmanager
def ablated(model, block, channels, mode, channel_mean=None):
    """Within the context, block `block`'s output has `channels` removed by `mode` (see MODES);
    channel_mean (D,) is what mode "mean" puts in their place."""
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; choose one of: {', '.join(MODES)}")
    channels = list(channels)
    removed = {}

    def at_block(_module, _inputs, out):
        new = out.clone()
        new[..., channels] = 0 if mode != "mean" else channel_mean[channels].to(out.dtype)
        removed["delta"] = out - new  # (N, T, D), zero outside the channels
        return new

    def at_norm(norm, inputs, out):
        frozen = _frozen_norm(norm, inputs[0], inputs[0] + removed["delta"])
        return out if frozen is None else frozen

    handles = [model.blocks[block].register_forward_hook(at_block)]
    if mode == "stats":
        norms = [m for b in model.blocks[block + 1:] for m in (b.norm1, b.norm2)]
        norms.append(model.final_layer.norm_final)
        handles += [norm.register_forward_hook(at_norm) for norm in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def choose(model, diffusion, train_x, train_y, k=2, seed=0):
    """The block and channels to ablate, chosen on training images as image_metrics' ablation group
    chooses them on held-out ones: the middle block with the largest top-1/median, its k channels that
    lead the most tokens. Returns (block, channels, the block's channel means (D,) over the probe)."""
    streams = metrics.capture(model, diffusion, train_x, train_y, seed=seed)
    middle = range(1, len(streams) - 1) if len(streams) > 2 else range(len(streams))
    block = max(middle, key=lambda b: metrics.stream_stats(streams[b])["ratio"])
    return block, metrics.recurring_channels(streams[block], k=k), streams[block].mean(dim=(0, 1))


@torch.no_grad()
def ablation_modes(model, diffusion, x, y, block, channels, channel_mean, *, random_draws=8, draws=2, seed=0):
    """The held-out loss rise of each mode on `channels` and on random_draws sets of as many others, paired
    over (image, t, noise): {"base", "n", "random_sets", per mode "{mode}_top_rise", "_top_rise_se",
    "_random_rise" (mean over the sets), "_random_rise_sd"}."""
    def losses():
        return metrics.input_losses(model, diffusion, x, y, draws=draws, seed=seed).double()

    base = losses()
    generator = torch.Generator().manual_seed(seed + 1)
    others = torch.tensor([c for c in range(model.config["hidden_size"]) if c not in set(channels)])
    sets = [others[torch.randperm(len(others), generator=generator)[:len(channels)]].tolist()
            for _ in range(random_draws)]
    out = {"base": base.mean().item(), "n": len(base), "random_sets": sets}
    for mode in MODES:
        with ablated(model, block, channels, mode, channel_mean):
            rise = losses() - base
        randoms = []
        for chosen in sets:
            with ablated(model, block, chosen, mode, channel_mean):
                randoms.append((losses() - base).mean().item())
        out.update({f"{mode}_top_rise": rise.mean().item(),
                    f"{mode}_top_rise_se": (rise.std() / np.sqrt(len(rise))).item(),
                    f"{mode}_random_rise": float(np.mean(randoms)),
                    f"{mode}_random_rise_sd": float(np.std(randoms, ddof=1)) if len(randoms) > 1 else 0.0})
    return out
