"""Shared analysis for the notebooks, sample.py and the measurements: the residual stream after each block
and its outliers (massive activations: Sun et al. 2024), finding run pairs, and the toy's samples, whose
every pixel is its own error (the data is exactly 0)."""

import json
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from diffusion import create_diffusion
from ditnorm.checkpoint import FORMAT, CheckpointError, diffusion_of, load_for_sampling, read_checkpoint
from ditnorm.layout import checkpoint_at, run_checkpoints  # noqa: F401 (analysis.checkpoint_at, as before)
from ditnorm.stats import fixed_quantiles
from fast import sample_toy
from models import TOY_MODELS, DiT_models

# Sun et al. 2024 call an activation massive when it is over 100 in magnitude and about 1000x the median.
MASSIVE_MIN_VALUE = 100.0
MASSIVE_MIN_RATIO = 1000.0


@torch.no_grad()
def capture_points(model, forward):
    """The residual stream at every point of the passes forward() makes through model, each concatenated
    over them: {"input": entering block 0, "block<b>": after block b, "final": entering the final layer}."""
    blocks = [f"block{b}" for b in range(len(model.blocks))]
    seen = {name: [] for name in ["input", *blocks, "final"]}
    hooks = [model.blocks[0].register_forward_pre_hook(lambda _m, args: seen["input"].append(args[0])),
             model.final_layer.register_forward_pre_hook(lambda _m, args: seen["final"].append(args[0]))]
    hooks += [block.register_forward_hook(lambda _m, _a, out, name=name: seen[name].append(out))
              for name, block in zip(blocks, model.blocks, strict=True)]
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts).detach().cpu() for name, parts in seen.items()}


def capture_block_outputs(model, x, t, y):
    """Run one forward pass and return the residual stream after every block: depth tensors (N, T, D)."""
    points = capture_points(model, lambda: model(x, t, y))
    outputs = [points[f"block{b}"] for b in range(len(model.blocks))]
    assert all(len(o) == len(x) for o in outputs), "each block must run exactly once per forward pass"
    return outputs


def noised_inputs(config, timestep, class_label, batch_size=1, *, generator=None, device="cpu"):
    """(x_t, t, y) for a model with this config: its data (N(0, 1) latents for a latent DiT, exactly 0 for a
    toy) noised to `timestep` with q_sample."""
    if not 0 <= class_label < config["num_classes"]:
        raise ValueError(f"class {class_label} out of range: {config['model']} has classes "
                         f"0..{config['num_classes'] - 1}")
    diffusion = create_diffusion("")
    shape = (batch_size, config["in_channels"], config["input_size"], config["input_size"])
    if config["model"] in TOY_MODELS:
        x_start = torch.zeros(shape)
    else:
        x_start = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    t = torch.full((batch_size,), int(timestep), dtype=torch.long)
    x_t = diffusion.q_sample(x_start, t, noise=noise)  # (N, C, H, W)
    y = torch.full((batch_size,), int(class_label), dtype=torch.long)
    return x_t.to(device), t.to(device), y.to(device)


def outlier_stats(outputs, *, min_value=MASSIVE_MIN_VALUE, min_ratio=MASSIVE_MIN_RATIO):
    """Per layer: top-3 |value| and median |value| over all samples, tokens and channels, and top1/median."""
    rows = []
    for layer, h in enumerate(outputs):
        a = h.abs().flatten().double()
        top = torch.topk(a, k=min(3, a.numel())).values.tolist() + [float("nan")] * 3
        median = a.median().item()
        ratio = top[0] / median if median > 0 else float("inf")
        rows.append(dict(layer=layer, top1=top[0], top2=top[1], top3=top[2], median=median, ratio=ratio,
                         massive=bool(top[0] > min_value and ratio >= min_ratio)))
    return rows


def format_outlier_table(rows, title=""):
    """Markdown table of outlier_stats rows."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| layer | top-1 | top-2 | top-3 | median | top-1 / median | massive |",
              "|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['top1']:.4g} | {r['top2']:.4g} | {r['top3']:.4g} "
                     f"| {r['median']:.3g} | {r['ratio']:.4g} | {'yes' if r['massive'] else ''} |")
    return "\n".join(lines)


def pick_tokens(num_tokens_total, k, seed):
    """k distinct token indices in increasing order, drawn with their own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, num_tokens_total)
    return sorted(torch.randperm(num_tokens_total, generator=g)[:k].tolist())


def plot_token_embeddings(outputs, tokens, *, sample=0, stats=None, title="", layer_labels=None):
    """|value| against channel index, one small panel per (layer, token); rows share a y-axis per layer.
    layer_labels name the rows (default: block 0, 1, ...)."""
    depth, ncol = len(outputs), len(tokens)
    fig, axes = plt.subplots(depth, ncol, figsize=(2.4 * ncol + 1.2, 0.95 * depth + 0.8), sharex=True,
                             sharey="row", squeeze=False)
    for layer, h in enumerate(outputs):
        for col, token in enumerate(tokens):
            ax = axes[layer, col]
            ax.plot(h[sample, token].abs().numpy(), linewidth=0.6, color="tab:blue")
            ax.tick_params(labelsize=6)
            if layer == 0:
                ax.set_title(f"token {token}", fontsize=8)
        label = f"block {layer if layer_labels is None else layer_labels[layer]}"
        if stats is not None:
            label += f"\nmax {stats[layer]['top1']:.3g}\nx{stats[layer]['ratio']:.3g} med"
        axes[layer, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes[-1]:
        ax.set_xlabel("channel", fontsize=7)
    fig.suptitle(title + "\n|value| of the residual stream after each block", fontsize=9)
    fig.tight_layout()
    return fig


# train_args that say how a run was saved or logged, not what it trained: runs may differ in these and pair.
NOT_TRAINING_KEYS = ("norm", "ckpt_steps", "ckpt_every", "log_every", "preset")


def run_setup(run_dir):
    """What a run trained, from its last checkpoint: the model config and train_args, norm left out."""
    path = checkpoint_at(run_dir)
    checkpoint = read_checkpoint(path)
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT
            and isinstance(checkpoint.get("config"), dict)):
        raise CheckpointError(f"{path} is no checkpoint written by train_toy.py (no {FORMAT} config); pass "
                              "run folders of train_toy.py")
    setup = {f"model.{k}": v for k, v in checkpoint["config"].items() if k != "norm"}
    train_args = checkpoint.get("train_args")
    train_args = train_args if isinstance(train_args, dict) else {}
    setup.update({k: v for k, v in train_args.items() if k not in NOT_TRAINING_KEYS})
    return setup


def _is_run_of(folder, norm, model):
    """Whether folder is a run of `norm` and `model` (None: any toy model): by its config.json, else by its
    name (<index>-<model>-<norm>, <data>-<norm>-seed<k>, <model>-<norm>-seed<k>)."""
    try:
        config = json.loads((folder / "config.json").read_text())["model_config"]
        right_model = config["model"] == model if model else config["model"] in TOY_MODELS
        return config["norm"] == norm and right_model
    except (OSError, ValueError, KeyError, TypeError):
        pass
    name = f"-{folder.name}-"
    if model:
        return f"-{model.replace('/', '-')}-{norm}-" in name
    others = (m.replace("/", "-") for m in DiT_models if m not in TOY_MODELS)
    return f"-{norm}-" in name and not any(f"-{other}-" in name for other in others)


def all_runs(results_dir, norm, model=None):
    """Run folders of (model, norm) with checkpoints anywhere under results_dir (any toy model if model is
    None), oldest first (by the time their first checkpoint was written)."""
    runs = [p for p in Path(results_dir).rglob(f"*{norm}*") if p.is_dir() and _is_run_of(p, norm, model)
            and run_checkpoints(p)]
    return sorted(runs, key=lambda p: (min(c.stat().st_mtime for c in run_checkpoints(p).values()), str(p)))


def find_run_pair(results_dir="results", layernorm_run="", none_run="", model=None, shipped=""):
    """(layernorm run, none run) trained alike but for the norm: a run not given is the newest under
    results_dir that matches the other (FileNotFoundError if a norm has none; then `shipped`, a weights
    folder, when neither is given); ValueError naming the settings two runs differ in."""
    given = {"layernorm": layernorm_run, "none": none_run}
    for norm, run in given.items():
        if run and not run_checkpoints(run):
            raise ValueError(f"{run} holds no checkpoints/<step>.pt; pass a run folder of train_toy.py "
                             f"--norm {norm}")
    candidates = {norm: ([Path(run)] if run else all_runs(results_dir, norm, model)[::-1])
                  for norm, run in given.items()}
    missing = [norm for norm, runs in candidates.items() if not runs]
    if missing and shipped and not (layernorm_run or none_run) and Path(shipped).is_dir():
        return find_run_pair(shipped, model=model)
    if missing:
        raise FileNotFoundError(f"no {model or 'toy'} run for norm {' or '.join(missing)} under "
                                f"{results_dir}; run make reproduce (or train_toy.py) or set the run folders")
    anchor = "none" if none_run and not layernorm_run else "layernorm"
    other = "none" if anchor == "layernorm" else "layernorm"
    first = candidates[anchor][0]
    wanted = run_setup(first)
    for run in candidates[other]:
        if run_setup(run) == wanted:
            return (first, run) if anchor == "layernorm" else (run, first)
    closest = candidates[other][0]
    theirs = run_setup(closest)
    differ = sorted(k for k in set(wanted) | set(theirs) if wanted.get(k) != theirs.get(k))
    shown = ", ".join(f"{k} {wanted.get(k)} vs {theirs.get(k)}" for k in differ[:4])
    raise ValueError(f"{first} and {closest} were trained differently ({shown}); pass two runs that differ "
                     "only in the norm")


def paired_steps(runs, steps=None):
    """The checkpoint steps to compare: `steps` (all saved by every run), or by default the first and last
    step that every run saved; ValueError naming what the runs share."""
    common = sorted(set.intersection(*(set(run_checkpoints(r)) for r in runs)))
    if not common:
        raise ValueError(f"{' and '.join(map(str, runs))} share no checkpoint step")
    if not steps:
        return sorted({common[0], common[-1]})
    if not set(steps) <= set(common):
        raise ValueError(f"steps {sorted(steps)} are not all saved by both runs; they share {common}")
    return sorted(set(steps))


def step_label(step):
    """10000 -> '10k', 2500 -> '2.5k', 500 -> '500'."""
    return f"{step / 1000:g}k" if step >= 1000 else str(step)


@torch.no_grad()
def fixed_noise_samples(model, train_args, num_samples, *, sampling_steps=None, seed=0, device="cpu",
                        fast="auto", progress=False, log=None):
    """(num_samples, C, H, W) float64 numpy samples of a model from the fixed noise set `seed` (a CPU
    generator reset on every call: every model and device meets the same noise), by the checkpoint's own
    diffusion (train_args) respaced to sampling_steps."""
    diffusion = diffusion_of(train_args, sampling_steps)
    generator = torch.Generator().manual_seed(seed)
    samples = sample_toy(model, diffusion, num_samples, generator=generator, device=device, fast=fast,
                         progress=progress, log=log)
    return samples.double().cpu().numpy()


def sample_checkpoint(path, num_samples=100, *, seed=0, device="cpu", num_sampling_steps=None,
                      progress=False, norm=None, use_ema=True):
    """Load a toy checkpoint and return (num_samples, C, H, W) float64 numpy samples and the model config,
    from the fixed noise set `seed` (fixed_noise_samples). `norm`, if given, must be the checkpoint's.
    `use_ema=False` samples the raw training weights instead of their EMA."""
    model, config, train_args = load_for_sampling(path, norm=norm, device=device, use_ema=use_ema)
    samples = fixed_noise_samples(model, train_args, num_samples, sampling_steps=num_sampling_steps,
                                  seed=seed, device=device, progress=progress)
    return samples, config


def error_stats(samples):
    """mean, median, p99 and max of the finite |x| (the toy's error), and how many were inf or nan."""
    a = np.abs(np.asarray(samples, dtype=np.float64)).ravel()
    finite = a[np.isfinite(a)]
    stats = dict(mean=np.mean, median=np.median, p99=lambda v: np.percentile(v, 99), max=np.max)
    return {**{k: float(f(finite)) if finite.size else float("nan") for k, f in stats.items()},
            "nonfinite": int(a.size - finite.size)}


@torch.no_grad()
def denoiser_x0(model, diffusion, x_t, t, class_label=0):
    """The denoiser's prediction of x_0 from x_t at timestep indices t (N,) of `diffusion`: the same
    p_mean_variance (predicted eps -> x_0) that every sampling step uses."""
    y = torch.full((x_t.shape[0],), class_label, dtype=torch.long, device=x_t.device)
    return diffusion.p_mean_variance(model, x_t, t, model_kwargs=dict(y=y))["pred_xstart"]


def denoiser_x0_errors(model, diffusion, *, timesteps=(0, 1, 5, 10), num_inputs=100_000, seed=0, data="zeros",
                       batch=8192, device="cpu"):
    """{t: (num_inputs * C*H*W,) float64 errors of the denoiser's x_0 prediction} on exact draws of
    q(x_t | x_0) (the same at every t, from `seed`): pixel_errors' |x0_pred| on zero data, its deviation from
    its image's mean on constant data."""
    if data not in ("zeros", "constant"):
        raise ValueError(f"data must be 'zeros' or 'constant', got {data!r}")
    config = model.config
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    errors = {}
    for timestep in timesteps:
        generator = torch.Generator().manual_seed(seed)
        parts = []
        for start in range(0, num_inputs, batch):
            n = min(batch, num_inputs - start)
            if data == "zeros":
                x_start = torch.zeros(n, *shape)
            else:
                x_start = (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1).expand(n, *shape)
            noise = torch.randn(n, *shape, generator=generator)
            t = torch.full((n,), int(timestep), dtype=torch.long)
            x_t = diffusion.q_sample(x_start, t, noise=noise)  # (n, C, H, W)
            pred = denoiser_x0(model, diffusion, x_t.to(device), t.to(device)).double().cpu().numpy()
            parts.append(pixel_errors(pred)["abs_x" if data == "zeros" else "dev_const"].ravel())
        errors[int(timestep)] = np.concatenate(parts)
    return errors


def denoiser_x0_error(model, diffusion, *, quantiles=(0.5, 0.99, 0.999), **kwargs):
    """{t: {"p50": ..., "p99": ..., "p99.9": ...}}: fixed quantiles of denoiser_x0_errors(model, diffusion,
    **kwargs) over all pixels of all inputs. A quantile, unlike the maximum, does not grow with num_inputs."""
    errors = denoiser_x0_errors(model, diffusion, **kwargs)
    return {t: fixed_quantiles(e, quantiles) for t, e in errors.items()}


def pixel_errors(samples):
    """(N, C, H, W) samples -> {"abs_x": |x|, the error on zero data, "dev_const": |x - mean of its sample|,
    the distance from the nearest constant image, the error on constant data}, each (N, C*H*W)."""
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)  # (N, P)
    return {"abs_x": np.abs(x), "dev_const": np.abs(x - x.mean(axis=1, keepdims=True))}


def ks_uniform(values, low, high):
    """Kolmogorov-Smirnov distance between the finite values' empirical CDF and U[low, high]."""
    v = np.asarray(values, dtype=np.float64)
    v = np.sort(v[np.isfinite(v)])
    if v.size == 0:
        return float("nan")
    cdf = np.clip((v - low) / (high - low), 0.0, 1.0)
    i = np.arange(1, v.size + 1)
    return float(max(np.max(i / v.size - cdf), np.max(cdf - (i - 1) / v.size)))


def format_error_table(rows):
    """Markdown table of dicts with keys model, step, num_samples, mean, median, max (and weights)."""
    lines = ["| model | step | weights | samples | mean abs x | median abs x | max abs x | non-finite |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['step']} | {r.get('weights', 'ema')} | {r['num_samples']} "
                     f"| {r['mean']:.3e} "
                     f"| {r['median']:.3e} | {r['max']:.3e} | {r.get('nonfinite', 0)} |")
    return "\n".join(lines)


def pixel_pairs(samples):
    """(N, 2, H, W) samples -> (N*H*W, 2) points: channel 0 against channel 1 of every pixel."""
    s = np.asarray(samples)
    assert s.ndim == 4 and s.shape[1] == 2, f"toy samples must be (N, 2, H, W), got {s.shape}"
    return np.stack([s[:, 0].ravel(), s[:, 1].ravel()], axis=1)


def plot_toy_scatter(samples_by_label, title=""):
    """Side-by-side scatter of channel 0 against channel 1 on shared symmetric-log axes (the models' errors
    differ by decades and have both signs), linear a decade below the smallest panel median |x|."""
    all_pairs = {label: pixel_pairs(s) for label, s in samples_by_label.items()}
    pairs = {label: p[np.isfinite(p).all(axis=1)] for label, p in all_pairs.items()}  # inf/nan: not drawable
    drawn = [np.abs(p) for p in pairs.values() if len(p)]
    smallest_median = min((np.median(a) for a in drawn), default=1.0)
    linthresh = 10.0 ** math.floor(math.log10(max(smallest_median, 1e-12))) / 10
    lim = max((a.max() for a in drawn), default=1.0) * 1.5
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4.4), squeeze=False)
    for ax, (label, p) in zip(axes[0], pairs.items(), strict=True):
        ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.6)
        for set_scale in (ax.set_xscale, ax.set_yscale):
            set_scale("symlog", linthresh=linthresh)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.axhspan(-linthresh, linthresh, color="0.9", zorder=0)
        ax.axvspan(-linthresh, linthresh, color="0.9", zorder=0)
        a = np.abs(p)
        info = f"median |x| {np.median(a):.2e}, max {a.max():.2e}" if len(p) else "no finite values"
        skipped = len(all_pairs[label]) - len(p)
        info += f" ({skipped} non-finite not drawn)" if skipped else ""
        ax.set_title(f"{label}\n{info}", fontsize=9)
        ax.set_xlabel("channel 0 value (symlog)")
        ax.set_ylabel("channel 1 value (symlog)")
        ax.grid(True, linewidth=0.3)
        ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    num_points = len(next(iter(all_pairs.values())))
    caption = (f"{num_points} pixel values per panel (target: exactly 0); grey band: linear part "
               f"|x| < {linthresh:.0e}")
    width = int(11 * fig.get_figwidth())  # characters of 9-point text that fit across the figure
    fig.suptitle("\n".join(textwrap.wrap(title, width) + textwrap.wrap(caption, width)), fontsize=9)
    fig.tight_layout()
    return fig
