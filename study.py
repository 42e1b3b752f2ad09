"""The study: what LayerNorm costs, measured across normalisations, seeds and two data sets.

    python study.py --preset cpu     # the CPU-sized study on 2 cores (see PRESETS), writes res/study_*
    python study.py --preset gpu     # the full-size study: batch 2048, 50k steps, lr 1e-4 (one GPU)
    python study.py --preset tiny --results-dir /tmp/s --res-dir /tmp/r    # seconds; what the tests run

Every (data, norm, seed) is one train_toy.py run with checkpoints spread evenly over the run. Each
checkpoint's EMA model (with --weights raw: its training weights) draws the same samples: the sampler's
generator is reset to --sample-seed for every checkpoint, so the initial noise and every per-step noise are
identical for all models, and the model is the only thing that differs between rows.

Two data sets (train_toy.py --data):
- zeros: every image is exactly 0 (the original study). The error of a pixel is |x| (measure abs_x).
- constant: every image is c * ones with c ~ U[-1, 1] drawn per sample, so the network has to carry the
  data scale as well as the noise scale. An unconditional sample has no "true c", so the error of a pixel
  is its distance from the sample's own mean, |x - mean(x)| (measure dev_const): the mean is the nearest
  constant image, so this is the per-pixel part of the distance to the data manifold. Whether the sampled
  c follow U[-1, 1] is checked separately: ks_c is the Kolmogorov-Smirnov distance of the sample means to
  U[-1, 1]. dev_const is also computed on the zeros runs, so the two data sets are compared like for like.

Spread across seeds: tables give the median over seeds and [min, max] over seeds; each seed's number is
itself a statistic over all pixel values (samples x 8) of that checkpoint.

PREDICTION for the constant-data experiment, written before it was first run (res/study_prediction.md
repeats it before each run and appends the outcome). Measure: the seed median of the median per-pixel
deviation |x - mean(x)| at the last checkpoint.
  P1  constant data is harder for every variant: the measure is larger on constant than on zeros data.
  P2  LayerNorm's loss of scale matters more there: the ratio layernorm / none is larger on constant data
      than on zeros data.
  P3  on constant data the two scale-removing norms (layernorm, rmsnorm) are both worse than the two that
      keep the scale (none, dyt), with seed ranges that do not overlap.
  P4  the coarse distribution is learnt by all variants: the KS distance of the sample means to U[-1, 1]
      is below 0.1 for every variant (the loss of scale shows in the fine detail, not in c).
"""

import argparse
import contextlib
import copy
import csv
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from diffusion import create_diffusion  # noqa: E402
from ditnorm import trainer as train_toy  # noqa: E402
from ditnorm.analysis import (  # noqa: E402
    capture_block_outputs,
    error_stats,
    ks_uniform,
    noised_inputs,
    outlier_stats,
    pixel_errors,
    run_checkpoints,
)
from ditnorm.checkpoint import check_sampling_steps, diffusion_of, load_for_sampling  # noqa: E402
from ditnorm.data import CONSTANT_RANGE, DATA_KINDS, rank_batches  # noqa: E402
from ditnorm.options import (  # noqa: E402
    Parser,
    add_fast_flag,
    check_device,
    check_folder,
    check_timestep,
    device,
    positive_float,
    positive_int,
    seed,
    unit_interval,
)
from fast import make_optimizer, make_train_step, sample_toy  # noqa: E402
from models import NORM_KINDS, TOY_MODELS, build_model  # noqa: E402

ERROR_KEYS = ("mean", "median", "p99", "max")
# Every run trains on train_toy.py's default diffusion (DiT's 1000 steps); sampling respaces it.
DIFFUSION_STEPS = train_toy.DEFAULTS["diffusion_steps"]

# Each preset is a complete study configuration; explicit flags override it.
PRESETS = {
    # The tests: two variants, two seeds, a 2-block model, seconds.
    "tiny": dict(model="ToyDiT-XS/1", norms="layernorm,none", data="zeros,constant", seeds=2,
                 global_batch_size=32, lr=1e-3, ema_decay=0.9, max_steps=20, num_checkpoints=2,
                 num_samples=50, sampling_steps=10, jobs=1, dyt_check=False, device="cpu"),
    # The CPU study: 27 runs in ~15 min on 2 idle cores, so each run is 3000 steps at batch 128 (lr 1e-3 as
    # train_toy.py's cpu preset, which needs 5000 steps at batch 256 to separate its two models); the EMA
    # keeps 6 time constants at the end (3000 x 0.002). Sampling is respaced to 100 steps (1000 would cost
    # ~1 min per checkpoint here). Still short of convergence: the errors may still fall at the end.
    "cpu": dict(model="ToyDiT/1", norms=",".join(NORM_KINDS), data="zeros,constant", seeds=3,
                global_batch_size=128, lr=1e-3, ema_decay=0.998, max_steps=3000, num_checkpoints=6,
                num_samples=1000, sampling_steps=100, jobs=2, dyt_check=True, device="cpu"),
    # The full size: the DiT recipe of the original study on one GPU. Not run here (no GPU).
    "gpu": dict(model="ToyDiT/1", norms=",".join(NORM_KINDS), data="zeros,constant", seeds=3,
                global_batch_size=2048, lr=1e-4, ema_decay=0.9999, max_steps=50_000, num_checkpoints=10,
                num_samples=1000, sampling_steps=1000, jobs=1, dyt_check=True, device="cuda"),
}


def parse_args(argv=None):
    """Flags left out take the preset's value (default preset: cpu). Every value is checked here, before
    any run starts (train_toy.py's own checks then never fire half-way through a study)."""
    parser = Parser(prog="study.py", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--model", choices=TOY_MODELS)
    parser.add_argument("--norms", help=f"comma-separated subset of {','.join(NORM_KINDS)}")
    parser.add_argument("--data", help=f"comma-separated subset of {','.join(DATA_KINDS)}")
    parser.add_argument("--seeds", type=positive_int, help="number of seeds per variant (seeds 0..N-1)")
    parser.add_argument("--global-batch-size", type=positive_int)
    parser.add_argument("--lr", type=positive_float)
    parser.add_argument("--ema-decay", type=unit_interval)
    parser.add_argument("--max-steps", type=positive_int)
    parser.add_argument("--num-checkpoints", type=positive_int, help="checkpoints per run, evenly spaced")
    parser.add_argument("--num-samples", type=positive_int, help="samples per checkpoint")
    parser.add_argument("--sampling-steps", type=positive_int,
                        help=f"ancestral DDPM steps (respaced from the runs' {DIFFUSION_STEPS})")
    parser.add_argument("--sample-seed", type=seed, default=0, help="the fixed noise set (default: 0)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                        help="which weights of each checkpoint sample, and of the final models' outlier "
                        "ratios and the DyT check: the EMA (what DiT samples with, the default) or the raw "
                        "training weights")
    parser.add_argument("--outlier-timestep", type=int, default=100,
                        help="timestep of the noised inputs for the outlier ratio (default: 100)")
    parser.add_argument("--jobs", type=positive_int,
                        help="runs trained and sampled in parallel, 1 thread each")
    parser.add_argument("--dyt-check", action=argparse.BooleanOptionalAction,
                        help="also train dyt with another lr and without adaLN-Zero (seed 0, zeros data)")
    parser.add_argument("--device", type=device,
                        help="device for training and sampling (cpu/tiny preset: cpu, gpu: cuda)")
    add_fast_flag(parser)
    parser.add_argument("--results-dir", default="results/study", help="run folders (default: results/study)")
    parser.add_argument("--res-dir", default="res", help="tables and figures (default: res)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # A repeated entry is one variant, not two (it would count its seeds twice, and two jobs would train
    # into one run folder at once).
    args.norms = list(dict.fromkeys(n.strip() for n in args.norms.split(",") if n.strip()))
    args.data = list(dict.fromkeys(d.strip() for d in args.data.split(",") if d.strip()))
    if not args.norms or set(args.norms) - set(NORM_KINDS):
        parser.error(f"--norms must be a comma-separated subset of {','.join(NORM_KINDS)}")
    if not args.data or set(args.data) - set(DATA_KINDS):
        parser.error(f"--data must be a comma-separated subset of {','.join(DATA_KINDS)}")
    if args.num_checkpoints > args.max_steps:
        parser.error("--num-checkpoints must not exceed --max-steps")
    problems = [("--sampling-steps", check_sampling_steps(args.sampling_steps, DIFFUSION_STEPS)),
                ("--outlier-timestep", check_timestep(args.outlier_timestep, DIFFUSION_STEPS)),
                ("--device", check_device(args.device)),
                ("--results-dir", check_folder(args.results_dir)), ("--res-dir", check_folder(args.res_dir))]
    for flag, problem in problems:
        if problem:
            parser.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: {problem}")
    return parser, args


#################################################################################
#                                 Statistics                                    #
#################################################################################


def seed_spread(values):
    """(median, min, max) over seeds of the finite values; nan if there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return (float(np.median(v)), float(v.min()), float(v.max())) if v.size else (np.nan,) * 3


#################################################################################
#                          Training and sampling                                #
#################################################################################


def checkpoint_steps(max_steps, num_checkpoints):
    """num_checkpoints steps evenly spread over the run, the last one at max_steps."""
    return sorted({round(max_steps * (k + 1) / num_checkpoints) for k in range(num_checkpoints)})


def log_every(max_steps):
    """train_toy.py's loss log window: 100 steps, or a tenth of a short run."""
    return max(1, min(100, max_steps // 10))


def train_flags(args, data, norm, seed):
    """The train_toy.py flags of one run (--data only when it is not the default, zeros)."""
    flags = ["--model", args.model, "--norm", norm, "--seed", str(seed),
             "--global-batch-size", str(args.global_batch_size), "--lr", repr(args.lr),
             "--ema-decay", repr(args.ema_decay), "--max-steps", str(args.max_steps),
             "--ckpt-steps", ",".join(map(str, checkpoint_steps(args.max_steps, args.num_checkpoints))),
             "--log-every", str(log_every(args.max_steps))]
    return flags + (["--data", data] if data != "zeros" else [])


def run_folder(args, data, norm, seed):
    """The folder of one (data, norm, seed) run; train_toy.py makes its run folder inside."""
    return Path(args.results_dir) / f"{data}-{norm}-seed{seed}"


def saved_train_args(run):
    """train_args of a run folder's config.json, or None if it has none (a start that failed before it)."""
    try:
        return json.loads((run / "config.json").read_text())["train_args"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_state(args, data, norm, seed):
    """("reuse", run folder) of a finished run with the same flags, ("train", half-made run folders to
    remove first), or ("refuse", why): decided for every run before any of them starts."""
    folder = run_folder(args, data, norm, seed)
    if folder.exists() and not folder.is_dir():
        return "refuse", f"{folder} is a file; delete it or pass another --results-dir"
    flags = train_flags(args, data, norm, seed)
    wanted = {k[2:].replace("-", "_"): v for k, v in zip(flags[0::2], flags[1::2], strict=True)}
    wanted.setdefault("data", "zeros")
    half_made = []
    for run in sorted(folder.glob("*-*")):
        saved = saved_train_args(run)
        if saved is None and run.is_dir() and not run_checkpoints(run):
            half_made.append(run)  # no config.json and no checkpoint: a start that failed
            continue
        same = saved is not None and all(str(saved.get(k, "zeros" if k == "data" else None)) == v
                                         for k, v in wanted.items())
        if same and args.max_steps in run_checkpoints(run):
            return "reuse", run
    others = [p for p in folder.iterdir() if p not in half_made] if folder.is_dir() else []
    if others:
        return "refuse", (f"{folder} holds another or an unfinished run; delete it or pass another "
                          "--results-dir")
    return "train", half_made


def train_run(args, data, norm, seed):
    """Train one run with train_toy.py, or reuse a finished run with the same flags: (folder, trained)."""
    folder = run_folder(args, data, norm, seed)
    state, detail = run_state(args, data, norm, seed)
    if state == "reuse":
        return detail, False
    if state == "refuse":
        raise SystemExit(f"error: {detail}")
    for run in detail:
        shutil.rmtree(run)  # half-made by a failed start: replaced by this run
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its log.txt keeps the log
        train_toy.main([*train_flags(args, data, norm, seed), "--device", args.device, "--fast", args.fast,
                        "--results-dir", str(folder)])
    print(f"study: trained {folder}", flush=True)
    return next(folder.glob("*-*")), True


@torch.no_grad()
def fixed_noise_samples(model, num_samples, sampling_steps, sample_seed, device="cpu", fast="auto",
                        train_args=None):
    """(N, C, H, W) float64 samples; the generator is reset to sample_seed, so every call shares its noise.

    The diffusion is the one of train_args (the checkpoint's; None: DiT's 1000 steps), respaced to
    sampling_steps. A CPU generator serves every device, so the noise set is the same on a GPU too."""
    diffusion = diffusion_of(train_args or {}, sampling_steps)
    generator = torch.Generator().manual_seed(sample_seed)
    samples = sample_toy(model, diffusion, num_samples, generator=generator, device=device, fast=fast,
                         log=print)
    return samples.double().cpu().numpy()


def checkpoint_rows(samples, data, norm, seed, step):
    """The csv rows of one checkpoint's samples: one per error measure that applies to the data."""
    means = samples.reshape(len(samples), -1).mean(axis=1)  # (N,) the sampled constants c
    rows = []
    for measure, errors in pixel_errors(samples).items():
        if data == "constant" and measure == "abs_x":
            continue  # |x| is no error when the data is not 0
        rows.append(dict(data=data, measure=measure, norm=norm, seed=seed, step=step, **error_stats(errors),
                         ks_c=ks_uniform(means, *CONSTANT_RANGE) if data == "constant" else np.nan))
    return rows


def measure_run(args, data, norm, seed):
    """Train one run and sample each checkpoint: csv rows, per-block outlier ratios of the final model, and
    (for the study's dyt seed-0 run on zeros) the default row of the DyT table."""
    torch.set_num_threads(1)
    run, trained = train_run(args, data, norm, seed)
    rows = []
    for step, path in run_checkpoints(run).items():
        model, config, train_args = load_for_sampling(path, device=args.device, use_ema=args.weights == "ema")
        samples = fixed_noise_samples(model, args.num_samples, args.sampling_steps, args.sample_seed,
                                      args.device, args.fast, train_args=train_args)
        rows += checkpoint_rows(samples, data, norm, seed, step)
    # Outliers of the final model on noised inputs of x0 = 0 (which is also a constant image, c = 0).
    generator = torch.Generator().manual_seed(args.sample_seed)
    x, t, y = noised_inputs(config, args.outlier_timestep, 0, batch_size=64, generator=generator,
                            device=args.device)
    ratios = [r["ratio"] for r in outlier_stats(capture_block_outputs(model, x, t, y))]
    is_dyt_default = (data, norm, seed) == ("zeros", "dyt", 0)
    dyt = dyt_row(DYT_DEFAULT, args.lr, last_logged_loss(run), model, samples) if is_dyt_default else None
    return dict(rows=rows, outliers=dict(data=data, norm=norm, seed=seed, ratios=ratios), dyt=dyt,
                trained=trained)


def dyt_check_run(args, setting):
    """Train dyt (seed 0, zeros data) under one setting in process; returns one row of the DyT table.

    train_toy.py has no switch for the initialisation, so this replays its loop with the same seed and the
    same per-step noise (data.rank_batches); only the setting differs from the study's dyt seed-0 run.
    """
    torch.set_num_threads(1)
    lr = args.lr * setting["lr_factor"]
    torch.manual_seed(0)
    model = build_model(args.model, norm="dyt").to(args.device)
    if not setting["adaln_zero"]:
        # Zhu et al. drop adaLN-Zero for DiT: the modulation layers start like every other Linear.
        for layer in [b.adaLN_modulation[-1] for b in [*model.blocks, model.final_layer]]:
            nn.init.xavier_uniform_(layer.weight)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model.parameters(), lr)
    diffusion = create_diffusion("")
    step = make_train_step(model, ema, diffusion, optimizer, ema_decay=args.ema_decay, fast=args.fast,
                           log=print)
    shape = (model.config["in_channels"], model.config["input_size"], model.config["input_size"])
    x_start = torch.zeros(args.global_batch_size, *shape, device=args.device)  # (B, C, H, W)
    y = torch.zeros(args.global_batch_size, dtype=torch.long, device=args.device)  # (B,)
    batches = rank_batches(0, range(1, args.max_steps + 1), args.global_batch_size, 0, 1,
                           diffusion.num_timesteps, shape, args.device)
    losses = torch.stack([step(x_start, t, noise, y) for t, noise in batches]).cpu()  # (max_steps,)
    sampled = ema if args.weights == "ema" else model.eval()
    samples = fixed_noise_samples(sampled, args.num_samples, args.sampling_steps, args.sample_seed,
                                  args.device, args.fast)
    window = losses[-log_every(args.max_steps):]
    return dyt_row(setting, lr, float(window.mean()), sampled, samples)


def dyt_row(setting, lr, last_loss, model, samples):
    """One row of the DyT table (model: the sampled weights)."""
    alphas = [p.item() for name, p in model.named_parameters() if name.endswith("alpha")]
    return dict(setting=setting["name"], lr=lr, adaln_zero=setting["adaln_zero"], last_loss=last_loss,
                alpha_min=min(alphas), alpha_max=max(alphas), **error_stats(samples))


def last_logged_loss(run):
    """The loss of train_toy.py's last log line of a run (mean over its last log window)."""
    lines = [line for line in (run / "log.txt").read_text().splitlines() if "| loss " in line]
    return float(lines[-1].split("| loss ")[1].split()[0])


# Figures of a study that sampled the raw weights (--weights raw) say so; the EMA ones keep their titles.
RAW_LABEL = {"raw": "Raw training weights: "}

# The study's own dyt seed-0 run is the default; the check adds these settings.
DYT_DEFAULT = dict(name="default (the study's run)", lr_factor=1.0, adaln_zero=True)
DYT_SETTINGS = (
    dict(name="lr / 3", lr_factor=1 / 3, adaln_zero=True),
    dict(name="lr x 3", lr_factor=3.0, adaln_zero=True),
    dict(name="no adaLN-Zero", lr_factor=1.0, adaln_zero=False),
)


def job(args, kind, spec):
    """One unit of work for the process pool."""
    return measure_run(args, *spec) if kind == "run" else dict(dyt=dyt_check_run(args, spec))


def run_all(args):
    """Every (data, norm, seed) run and the DyT check, `args.jobs` at a time: (rows, outliers, dyt rows)."""
    jobs = [("dyt", setting) for setting in DYT_SETTINGS] if args.dyt_check else []
    jobs += [("run", (d, n, s)) for d in args.data for n in args.norms for s in range(args.seeds)]
    if args.jobs == 1:
        results = [job(args, kind, spec) for kind, spec in jobs]
    else:
        # spawn, not fork: a forked torch process can deadlock in its thread pool.
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(job, [args] * len(jobs), *zip(*jobs, strict=True)))
    rows = [row for r in results for row in r.get("rows", [])]
    outliers = [r["outliers"] for r in results if "outliers" in r]
    dyt_rows = [r["dyt"] for r in results if r["dyt"] is not None]
    dyt_rows.sort(key=lambda row: row["setting"] != DYT_DEFAULT["name"])  # the default first
    trained = sum(r.get("trained", True) for r in results)  # the DyT check always trains
    return rows, outliers, dyt_rows, (trained, len(results) - trained)


#################################################################################
#                            Tables and figures                                 #
#################################################################################

MEASURE_LABELS = {"abs_x": "|x|", "dev_const": "|x - mean(x)|"}
TABLE_LABELS = {"abs_x": "abs x", "dev_const": "abs(x - mean x)"}  # no pipes inside markdown cells


def grouped(rows, *keys):
    """{(values of keys): [rows]} in first-seen order."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def spread_cell(values, fmt=".2e"):
    """'median [min, max]' over seeds."""
    med, low, high = seed_spread(values)
    return f"{med:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def error_table(rows, with_step):
    """Markdown table: one line per (data, measure, norm[, step]) with the seed spread of each statistic."""
    keys = ("data", "measure", "norm") + (("step",) if with_step else ())
    head = "| data | error | norm |" + (" step |" if with_step else "") + " seeds | " + " | ".join(
        ERROR_KEYS) + " | non-finite | KS(c) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, group in grouped(rows, *keys).items():
        ks = [r["ks_c"] for r in group]
        cells = [key[0], TABLE_LABELS[key[1]], *map(str, key[2:]), str(len(group))]
        cells += [spread_cell([r[k] for r in group]) for k in ERROR_KEYS]
        cells += [str(sum(r["nonfinite"] for r in group)),
                  spread_cell(ks, ".3f") if np.isfinite(ks).any() else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outlier_table(outliers):
    """Markdown table of the per-block top-1 / median ratio, median [min, max] over seeds."""
    depth = len(outliers[0]["ratios"])
    lines = ["| data | norm | " + " | ".join(f"block {i}" for i in range(depth)) + " |",
             "|---|---|" + "---|" * depth]
    for (data, norm), group in grouped(outliers, "data", "norm").items():
        cells = [spread_cell([g["ratios"][i] for g in group], ".3g") for i in range(depth)]
        lines.append(f"| {data} | {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dyt_table(dyt_rows):
    """Markdown table of the DyT check."""
    lines = ["| setting | lr | adaLN-Zero | last loss | median abs x | p99 | max | alpha min..max |",
             "|---|---:|:---:|---:|---:|---:|---:|---|"]
    for r in dyt_rows:
        lines.append(f"| {r['setting']} | {r['lr']:.3g} | {'yes' if r['adaln_zero'] else 'no'} "
                     f"| {r['last_loss']:.5f} | {r['median']:.2e} | {r['p99']:.2e} | {r['max']:.2e} "
                     f"| {r['alpha_min']:.3f}..{r['alpha_max']:.3f} |")
    return "\n".join(lines)


def errors_markdown(rows, outliers, dyt_rows, setup):
    """res/study_errors.md: setup, last-checkpoint table, every-checkpoint table, outliers, DyT check."""
    last = max(r["step"] for r in rows)
    raw_note = " (raw training weights)" if setup["weights"] == "raw" else ""
    parts = [
        "# Study: sample error by normalisation, seed and data (made by study.py)", "",
        f"Command: `{setup['command']}`, wall time {setup['wall_time_s']:.0f} s on {setup['cpus']} CPU cores "
        f"({setup['machine']}, device {setup['device']}, torch {setup['torch']}), {setup['jobs']} jobs; "
        f"{setup['trained']} runs trained by this command, {setup['reused']} finished runs reused from "
        f"{setup['results_dir']} (sampling and statistics always rerun).", "",
        f"Setup: {setup['model']}, global batch {setup['global_batch_size']}, AdamW lr {setup['lr']:g}, "
        f"EMA {setup['ema_decay']}, {setup['max_steps']} steps, checkpoints at {setup['checkpoints']}, "
        f"{setup['seeds']} seeds per variant. Each checkpoint's "
        f"{'EMA' if setup['weights'] == 'ema' else 'raw (training)'} model draws {setup['num_samples']} "
        f"samples by ancestral sampling in {setup['sampling_steps']} steps, all from the same noise (seed "
        f"{setup['sample_seed']}).", "",
        "Each seed's number is a statistic over all pixel values of its samples; a cell is the median over "
        "seeds and [min, max] over seeds. Error |x| on zeros data; |x - mean(x)| (distance of each pixel "
        "from its sample's mean, the nearest constant image) on both data sets. KS(c): Kolmogorov-Smirnov "
        "distance of the sample means to U[-1, 1] (constant data only). Per-seed rows: study_errors.csv.",
        "", f"## Last checkpoint (step {last})", "",
        error_table([r for r in rows if r["step"] == last], with_step=False),
        "", "## Every checkpoint", "", error_table(rows, with_step=True), "",
        f"## Outlier ratio of the final models{raw_note} (top-1 / median abs value of the residual stream "
        f"after each block, on 64 noised inputs of x0 = 0 at t = {setup['outlier_timestep']})", "",
        outlier_table(outliers), "",
    ]
    if dyt_rows:
        parts += ["## DyT check (seed 0, zeros data, same steps and sampling)", "", dyt_table(dyt_rows), ""]
    return "\n".join(parts)


def band_plot(ax, groups, y_of):
    """One line per norm (median over seeds) with a min-max band; groups: {norm: {x: [values]}}."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (norm, by_x) in zip(colors, groups.items(), strict=False):
        xs = sorted(by_x)
        med, low, high = np.array([seed_spread(y_of(by_x[x])) for x in xs]).T
        ax.plot(xs, med, marker="o", markersize=3, color=color, label=norm)
        ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.grid(True, which="both", linewidth=0.3)


def seed_note(rows):
    """What a figure's lines and bands are: a band only where there is more than one seed."""
    seeds = len({r["seed"] for r in rows})
    return " (one seed)" if seeds == 1 else f" (line: median over {seeds} seeds; band: min-max over seeds)"


def plot_error_vs_step(rows, path, weights="ema"):
    """Median, 99th percentile and max error against training step; columns: data and error measure."""
    panels = list(grouped(rows, "data", "measure"))
    fig, axes = plt.subplots(3, len(panels), figsize=(4.4 * len(panels), 9.5), squeeze=False, sharex=True)
    for col, (data, measure) in enumerate(panels):
        panel_rows = [r for r in rows if (r["data"], r["measure"]) == (data, measure)]
        groups = {norm: {step: g for (step,), g in grouped(norm_rows, "step").items()}
                  for (norm,), norm_rows in grouped(panel_rows, "norm").items()}
        for row, stat in enumerate(("median", "p99", "max")):
            ax = axes[row, col]
            band_plot(ax, groups, lambda g, stat=stat: [r[stat] for r in g])
            ax.set_title(f"{data} data: {stat} of {MEASURE_LABELS[measure]}", fontsize=9)
        axes[-1, col].set_xlabel("training step")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(RAW_LABEL.get(weights, "") + "Sample error against training step" + seed_note(rows),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_outlier_ratio(outliers, path, timestep, weights="ema"):
    """Per-block top-1 / median |value| of each variant's final models, one panel per data set."""
    panels = list(grouped(outliers, "data"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (data,) in zip(axes[0], panels, strict=True):
        groups = {norm: {i: [g["ratios"][i] for g in group] for i in range(len(group[0]["ratios"]))}
                  for (norm,), group in grouped([o for o in outliers if o["data"] == data], "norm").items()}
        band_plot(ax, groups, lambda values: values)
        ax.set_title(f"models trained on {data} data", fontsize=9)
        ax.set_xlabel("block")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, 0].set_ylabel("top-1 / median abs value")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(RAW_LABEL.get(weights, "") + "Outliers in the residual stream of the final models\n(inputs: "
                 f"x0 = 0 noised to t = {timestep})" + seed_note(outliers), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#################################################################################
#                        Prediction and its outcome                             #
#################################################################################


def write_prediction(path, command):
    """Write the prediction of this module's docstring before any run starts; the outcome is pending."""
    text = __doc__[__doc__.index("PREDICTION"):].rstrip()
    path.write_text(f"# Prediction for the constant-data experiment\n\nWritten by `{command}` at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}, before its runs started.\n\n```\n{text}\n```\n\n"
                    "## Outcome\n\npending: the runs have not finished.\n")


def prediction_outcome(rows):
    """Check P1-P4 on the last checkpoint: a list of (name, held: True/False/None if not testable, detail)."""
    last = max(r["step"] for r in rows)
    final = [r for r in rows if r["step"] == last and r["measure"] == "dev_const"]
    per_seed = {key: [r["median"] for r in group] for key, group in grouped(final, "data", "norm").items()}
    med = {key: seed_spread(values)[0] for key, values in per_seed.items()}
    norms = [n for (d, n) in per_seed if d == "constant" and ("zeros", n) in per_seed]
    results = []
    detail = ", ".join(f"{n}: {med['zeros', n]:.2e} -> {med['constant', n]:.2e}" for n in norms)
    results.append(("P1", all(med["constant", n] > med["zeros", n] for n in norms) if norms else None,
                    f"median deviation zeros -> constant: {detail}"))
    if {"layernorm", "none"} <= set(norms):
        ratio = {d: med[d, "layernorm"] / med[d, "none"] for d in DATA_KINDS}
        results.append(("P2", ratio["constant"] > ratio["zeros"],
                        f"layernorm / none: zeros {ratio['zeros']:.3g}, constant {ratio['constant']:.3g}"))
    else:
        results.append(("P2", None, "needs layernorm and none"))
    if set(NORM_KINDS) <= set(norms):
        worst_kept = max(max(per_seed["constant", n]) for n in ("none", "dyt"))
        best_removed = min(min(per_seed["constant", n]) for n in ("layernorm", "rmsnorm"))
        results.append(("P3", best_removed > worst_kept,
                        f"best seed of layernorm/rmsnorm {best_removed:.2e}, worst seed of none/dyt "
                        f"{worst_kept:.2e}"))
    else:
        results.append(("P3", None, "needs all four norms"))
    ks = {n: seed_spread([r["ks_c"] for r in final if r["data"] == "constant" and r["norm"] == n])[0]
          for n in norms}
    results.append(("P4", all(v < 0.1 for v in ks.values()) if ks else None,
                    "KS(c) seed medians: " + ", ".join(f"{n} {v:.3f}" for n, v in ks.items())))
    return results


def append_outcome(path, rows):
    """Replace the pending outcome of the prediction file by the checked one."""
    verdict = {True: "held", False: "did not hold", None: "not testable with these variants"}
    lines = [f"- {name} {verdict[held]}: {detail}" for name, held, detail in prediction_outcome(rows)]
    text = path.read_text().split("## Outcome")[0]
    outcome = "## Outcome\n\nAt the last checkpoint, from study_errors.csv:\n\n" + "\n".join(lines) + "\n"
    path.write_text(text + outcome)


#################################################################################
#                                    Main                                       #
#################################################################################


def write_csv(rows, path):
    """The per-seed rows as csv."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.dyt_check and ("dyt" not in args.norms or "zeros" not in args.data):
        parser.error("--dyt-check compares with the study's dyt run: it needs dyt in --norms and zeros in "
                     "--data (or pass --no-dyt-check)")
    refused = [detail for d in args.data for n in args.norms for s in range(args.seeds)
               if (state := run_state(args, d, n, s))[0] == "refuse" for detail in state[1:]]
    if refused:  # before any run starts, not after hours of the others
        parser.fail(refused[0] + (f" (and {len(refused) - 1} more run folders like it)" if len(refused) > 1
                                  else ""))
    res_dir = Path(args.res_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python study.py", *(sys.argv[1:] if argv is None else argv)])
    predict = set(DATA_KINDS) <= set(args.data)
    if predict:
        write_prediction(res_dir / "study_prediction.md", command)
    start = time.perf_counter()
    rows, outliers, dyt_rows, (trained, reused) = run_all(args)
    wall = time.perf_counter() - start
    setup = dict(vars(args), command=command, wall_time_s=wall, torch=torch.__version__,
                 machine=platform.machine(), cpus=os.cpu_count(),
                 checkpoints=checkpoint_steps(args.max_steps, args.num_checkpoints), trained=trained,
                 reused=reused)
    write_csv(rows, res_dir / "study_errors.csv")
    (res_dir / "study_errors.md").write_text(errors_markdown(rows, outliers, dyt_rows, setup))
    plot_error_vs_step(rows, res_dir / "study_error_vs_step.png", args.weights)
    plot_outlier_ratio(outliers, res_dir / "study_outlier_ratio.png", args.outlier_timestep, args.weights)
    if predict:
        append_outcome(res_dir / "study_prediction.md", rows)
    print(f"study: {len(rows)} rows in {wall:.0f} s -> {res_dir}/study_errors.md, study_errors.csv, "
          "study_error_vs_step.png, study_outlier_ratio.png" + (", study_prediction.md" if predict else ""))


if __name__ == "__main__":
    main()
