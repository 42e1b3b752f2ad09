"""What the MNIST study measures of one image DiT, nothing downloaded (docs/instruments.md): the held-out NLL
bound (nll, nll_fresh), the denoiser's x_0 precision on the background (precision), samples scored by the
digit classifier (samples, sample_draws, real_floor), the residual stream (capture, capture_points,
stream_stats, input_outliers) and the zeroing of its recurring channels (ablation; ablation.py goes
further)."""

import math

import numpy as np
import torch

from ditnorm import analysis
from ditnorm.classifier import embed, frechet_distance, gaussian_fit
from ditnorm.images import to_pixels

# The probe's timesteps as fractions of T: t = 10, 100, 500, 900 of DiT's 1000.
PROBE_FRACTIONS = (0.01, 0.1, 0.5, 0.9)
# Log-spaced error bins from 1e-7 to 100 (beyond: the last bin): quantiles to 0.5%.
ERROR_EDGES = np.concatenate([[0.0], np.geomspace(1e-7, 100.0, 4000), [np.inf]])


def _batches(n, batch):
    return [slice(s, min(s + batch, n)) for s in range(0, n, batch)]


@torch.no_grad()
def nll(model, diffusion, x, y, *, strata=20, seed=0, batch=250):
    """Mean held-out bound in bits/dim and its standard error over images: {"nll_bpd", "nll_se", "n"}."""
    generator = torch.Generator().manual_seed(seed)
    chosen = diffusion.bound_strata(strata, generator)
    totals = []
    for rows in _batches(len(x), batch):
        out = diffusion.calc_bpd_loop(model, x[rows], model_kwargs={"y": y[rows]}, timesteps=chosen,
                                      generator=generator)
        totals.append(out["total_bpd"])
    total = torch.cat(totals)
    return {"nll_bpd": total.mean().item(), "nll_se": (total.std() / math.sqrt(len(total))).item(),
            "n": len(total)}


@torch.no_grad()
def nll_fresh(model, diffusion, x, y, *, strata=20, exact=10, spacing="geometric", draws=2, seed=0,
              batch=500):
    """The held-out bound with fresh timestep and noise draws for every image (`draws` estimates each,
    averaged), under both clip_denoised settings from the same network calls: nll_se over images includes
    the sampling, nll_draw_se is the sampling's part alone (docs/instruments.md). The draws depend on the
    images' count and the seed only, so two models' per-image estimates pair. {"clipped": {"nll_bpd",
    "nll_se", "nll_draw_se", "n", "images" (each image's estimate)}, "unclipped": {...}}."""
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(draws):
        totals = []
        for rows in _batches(len(x), batch):
            chosen = diffusion.bound_strata(strata, generator, exact=exact, size=rows.stop - rows.start,
                                            spacing=spacing)
            out = diffusion.calc_bpd_loop(model, x[rows], model_kwargs={"y": y[rows]}, timesteps=chosen,
                                          generator=generator, clip_denoised=(True, False))
            totals.append(out["total_bpd"])  # (2, n)
        estimates.append(torch.cat(totals, dim=1))
    estimates = torch.stack(estimates)  # (draws, 2, N)
    per_image = estimates.mean(dim=0)  # (2, N)
    n = per_image.shape[1]
    # The variance of an image's mean over its draws is the draws' variance / draws.
    draw_var = estimates.var(dim=0) / draws if draws > 1 else torch.full_like(per_image, float("nan"))
    return {name: {"nll_bpd": mean.mean().item(), "nll_se": (mean.std() / math.sqrt(n)).item(),
                   "nll_draw_se": math.sqrt(var.mean().item() / n), "n": n, "images": mean.double().numpy()}
            for name, mean, var in zip(("clipped", "unclipped"), per_image, draw_var, strict=True)}


def histogram_quantile(counts, q):
    """The q-quantile of values binned on ERROR_EDGES (the upper edge of the bin that reaches q)."""
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
    return float(ERROR_EDGES[min(index + 1, len(ERROR_EDGES) - 1)])


@torch.no_grad()
def precision(model, diffusion, x, y, *, timestep=0, num_inputs=10_000, seed=0, batch=500):
    """The denoiser's x_0 prediction at `timestep` on num_inputs fresh noisy copies of the images x: the
    background's p50 / p99.9 of |x0_pred - x0| (unclipped: clipping would hide the errors below -1) and the
    share of background and of all pixels on another 8-bit level than the data's, with their counts."""
    generator = torch.Generator().manual_seed(seed)
    counts = np.zeros(len(ERROR_EDGES) - 1, dtype=np.int64)
    wrong_bg = wrong_all = pixels_bg = pixels_all = inputs = 0
    levels = to_pixels(x)
    while inputs < num_inputs:
        for rows in _batches(len(x), batch):
            x0 = x[rows]
            n = min(x0.shape[0], num_inputs - inputs)
            if n <= 0:
                break
            x0, label, level = x0[:n], y[rows][:n], levels[rows][:n]
            t = torch.full((n,), timestep, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = diffusion.q_sample(x0, t, noise=noise)
            pred = diffusion.p_mean_variance(model, x_t, t, model_kwargs={"y": label})["pred_xstart"]
            error = (pred - x0).abs()
            background = x0 == -1
            counts += np.histogram(error[background].numpy(), ERROR_EDGES)[0]
            wrong = to_pixels(pred) != level
            wrong_bg += int(wrong[background].sum())
            wrong_all += int(wrong.sum())
            pixels_bg += int(background.sum())
            pixels_all += wrong.numel()
            inputs += n
    return {"timestep": timestep, "bg_p50": histogram_quantile(counts, 0.5),
            "bg_p999": histogram_quantile(counts, 0.999), "bg_wrong_level": wrong_bg / pixels_bg,
            "all_wrong_level": wrong_all / pixels_all, "inputs": inputs, "bg_pixels": pixels_bg}


@torch.no_grad()
def samples(model, diffusion, per_class, *, num_classes=10, seed=0, batch=500):
    """(images (N, C, H, W) in [-1, 1], labels (N,)): per_class ancestral samples of every class, drawn
    with clip_denoised (pixel data) from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    c, s = model.config["in_channels"], model.config["input_size"]
    out = [diffusion.p_sample_loop(model, (rows.stop - rows.start, c, s, s), clip_denoised=True,
                                   model_kwargs={"y": labels[rows]}, generator=generator)
           for rows in _batches(len(labels), batch)]
    return torch.cat(out), labels


def sample_scores(classifier, images, labels, reference_fit):
    """{"fid": Fréchet distance of the classifier's features to reference_fit, "accuracy", "n"}."""
    features, predicted = embed(classifier, images)
    return {"fid": frechet_distance(gaussian_fit(features.numpy()), reference_fit),
            "accuracy": (predicted == labels).double().mean().item(), "n": len(labels)}


def sample_draws(model, diffusion, classifier, reference_fit, per_class, *, draws=3, num_classes=10, seed=0):
    """sample_scores of `draws` independent sample draws (seeds seed, seed + 1, ...; seed 0 is the samples
    group's draw) and of all of them pooled: ([per-draw scores], pooled scores)."""
    scores, pooled = [], []
    for draw in range(draws):
        images, labels = samples(model, diffusion, per_class, num_classes=num_classes, seed=seed + draw)
        scores.append(sample_scores(classifier, images, labels, reference_fit))
        pooled.append((images, labels))
    images, labels = (torch.cat(parts) for parts in zip(*pooled, strict=True))
    return scores, sample_scores(classifier, images, labels, reference_fit)


def real_floor(features, reference_fit, size, *, draws=10, seed=0):
    """The Fréchet distance of `draws` random subsets of `size` real images' features (N, F) to
    reference_fit: what a perfect model's samples of that size would score. (mean, sd) over the draws."""
    generator = torch.Generator().manual_seed(seed)
    subsets = [torch.randperm(len(features), generator=generator)[:size] for _ in range(draws)]
    values = [frechet_distance(gaussian_fit(features[rows].numpy()), reference_fit) for rows in subsets]
    return float(np.mean(values)), float(np.std(values, ddof=1))


def capture(model, diffusion, x, y, fractions=PROBE_FRACTIONS, seed=0):
    """The residual stream after every block over the images x at t = fraction * T for each fraction:
    depth tensors (len(fractions) * N, T, D), from one seeded noise draw per timestep (capture_points')."""
    points = capture_points(model, diffusion, x, y, fractions, seed)
    return [points[f"block{b}"] for b in range(len(model.blocks))]


def capture_points(model, diffusion, x, y, fractions=PROBE_FRACTIONS, seed=0):
    """analysis.capture_points over the images x at t = fraction * T for each fraction, one seeded noise draw
    per timestep: {"input", "block<b>", "final"}, each (len(fractions) * N, T, D)."""
    generator = torch.Generator().manual_seed(seed)

    def forward():
        for timestep in (int(f * diffusion.num_timesteps) for f in fractions):
            t = torch.full((len(x),), timestep, dtype=torch.long)
            model(diffusion.q_sample(x, t, noise=torch.randn(x.shape, generator=generator)), t, y)

    return analysis.capture_points(model, forward)


def input_outliers(h):
    """Sun et al.'s statistic per input (one image at one timestep) of a stream h (N, T, D): the largest
    |value| over its tokens and channels over their median, as quantiles over the N inputs, and the share
    of inputs with a massive activation (analysis.outlier_stats' thresholds, per input)."""
    a = h.abs().flatten(1).double()  # (N, T * D)
    top1, median = a.amax(dim=1), a.median(dim=1).values
    ratio = top1 / median.clamp_min(1e-30)
    massive = (top1 > analysis.MASSIVE_MIN_VALUE) & (ratio >= analysis.MASSIVE_MIN_RATIO)
    quantiles = torch.tensor([0.5, 0.9], dtype=torch.float64)
    (ratio_p50, ratio_p90), (top1_p50, top1_p90) = ratio.quantile(quantiles), top1.quantile(quantiles)
    return {"ratio_p50": ratio_p50.item(), "ratio_p90": ratio_p90.item(), "ratio_max": ratio.max().item(),
            "top1_p50": top1_p50.item(), "top1_p90": top1_p90.item(), "median_p50": median.median().item(),
            "massive_share": massive.double().mean().item(), "inputs": len(a)}


def stream_stats(h):
    """One block's stream h (N, T, D): outlier_stats' top-1, median, ratio and massive; the 3 channels of
    largest peaks; the channel that leads most tokens and its share; the median share of a token's variance
    (what LayerNorm divides by) in its top 1 and top 4 channels."""
    row = analysis.outlier_stats([h])[0]
    del row["layer"]
    a = h.abs()
    peaks = a.amax(dim=(0, 1))  # (D,)
    leaders = torch.bincount(a.argmax(dim=-1).flatten(), minlength=h.shape[-1])  # (D,)
    centred = (h - h.mean(dim=-1, keepdim=True)) ** 2  # (N, T, D)
    total = centred.sum(dim=-1).clamp_min(1e-30)  # (N, T)
    top = torch.topk(centred, k=min(4, h.shape[-1]), dim=-1).values  # (N, T, 4)
    row.update(top_channels=torch.topk(peaks, k=min(3, len(peaks))).indices.tolist(),
               lead_channel=int(leaders.argmax()), lead_share=(leaders.max() / leaders.sum()).item(),
               var_top1=(top[..., 0] / total).median().item(), var_top4=(top.sum(-1) / total).median().item())
    return row


def recurring_channels(h, k=2):
    """The k channels that lead the most tokens of h (N, T, D)."""
    leaders = torch.bincount(h.abs().argmax(dim=-1).flatten(), minlength=h.shape[-1])
    return torch.topk(leaders, k=k).indices.tolist()


@torch.no_grad()
def input_losses(model, diffusion, x, y, *, draws=2, seed=0, batch=500):
    """The eps MSE of the training loss of each image at each of `draws` fixed (t, noise): (draws * N,)."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(draws):
        for rows in _batches(len(x), batch):
            x0 = x[rows]
            t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            out = diffusion.training_losses(model, x0, t, model_kwargs={"y": y[rows]}, noise=noise)
            losses.append(out["mse"])
    return torch.cat(losses)


def heldout_loss(model, diffusion, x, y, *, draws=2, seed=0, batch=500):
    """The eps MSE of the training loss on the held-out images, at `draws` fixed (t, noise) per image."""
    return input_losses(model, diffusion, x, y, draws=draws, seed=seed, batch=batch).double().mean().item()


def ablation(model, diffusion, x, y, block, channels, *, random_draws=8, seed=0):
    """The held-out loss with block `block`'s output channels zeroed: the given ones, and as many random
    ones (mean over random_draws). {"base", "top", "random", "top_rise", "random_rise", "channels"}."""

    def loss_without(zeroed):
        def hook(_module, _inputs, out):
            out = out.clone()
            out[..., zeroed] = 0
            return out

        handle = model.blocks[block].register_forward_hook(hook)
        try:
            return heldout_loss(model, diffusion, x, y, seed=seed)
        finally:
            handle.remove()

    base = heldout_loss(model, diffusion, x, y, seed=seed)
    top = loss_without(list(channels))
    generator = torch.Generator().manual_seed(seed + 1)
    width = model.config["hidden_size"]
    randoms = [loss_without(torch.randperm(width, generator=generator)[:len(channels)].tolist())
               for _ in range(random_draws)]
    random = float(np.mean(randoms))
    return {"block": block, "channels": list(channels), "base": base, "top": top, "random": random,
            "top_rise": top - base, "random_rise": random - base}
