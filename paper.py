"""The claim at the paper's own schedule, with seeds, and why LayerNorm's EMA is worse than its raw weights.

    python paper.py train --seeds 0,1,2 --jobs 2       # train (or resume) layernorm and none, 1 thread each
    python paper.py measure --jobs 2                   # sample and measure every checkpoint not yet measured
    python paper.py measure --stats-only               # weight norms and residual RMS only (seconds each)
    python paper.py perturb --seeds 1                  # exploratory: the last checkpoint's sharpness
    python paper.py report                             # tables, figures and the predictions' outcome
    python paper.py measure --preset tiny --results-dir /tmp/p --res-dir /tmp/r    # what the tests run

Runs: train_toy.py at its defaults (batch 2048, lr 1e-4, EMA 0.9999, 50k steps, zero data) with a
checkpoint every 5k steps, one folder per (norm, seed) under --results-dir; an unfinished run is resumed
from its last checkpoint. Every checkpoint also holds the averages of averaging.py.

Measurements, per (norm, seed, step, weights), written per run under --res-dir/runs/<norm>-seed<k>/ (small
files, committed as runs finish): errors.csv, the median, 99th percentile and max of |x| over 1000 samples
x 1000 ancestral steps from one fixed noise set (the data is 0, so |x| is the error); weights.csv, the norm
of every residual-stream writer and its cosine to the raw weights; rms.csv, the residual stream's RMS after
every block on noised inputs. The last step's |x| values are kept (pixels.npz) for the bootstrap intervals.
`report` recomputes the tables and figures from whatever run files exist and says how many seeds each
number rests on; its outcome is appended to --res-dir/prediction.md (written before the first measurement).
"""

import copy
import csv
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from diffusion import create_diffusion
from ditnorm import paper_report
from ditnorm.analysis import capture_block_outputs, error_stats, noised_inputs, run_checkpoints
from ditnorm.averaging import DEFAULT_AVERAGES
from ditnorm.checkpoint import load_model
from ditnorm.options import Parser, add_fast_flag, positive_int
from fast import sample_toy

ROOT = Path(__file__).resolve().parent
WEIGHTS = ("raw", "ema", *DEFAULT_AVERAGES)
RMS_TIMESTEPS = (10, 100, 500, 900)
PRESETS = {
    # The paper schedule: train_toy.py's defaults, a checkpoint every 5k steps.
    "paper": dict(model="ToyDiT/1", max_steps=50_000, ckpt_every=5000, global_batch_size=2048, lr=1e-4,
                  num_samples=1000, sampling_steps=1000, rms_batch=256),
    # The tests: seconds.
    "tiny": dict(model="ToyDiT-XS/1", max_steps=20, ckpt_every=10, global_batch_size=16, lr=1e-3,
                 num_samples=20, sampling_steps=10, rms_batch=8),
}


def parse_args(argv=None):
    parser = Parser(prog="paper.py", description=__doc__)
    parser.add_argument("command", choices=("train", "measure", "perturb", "report"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                        help="paper: the schedule of the claim; tiny: seconds, for the tests "
                        "(default: paper)")
    parser.add_argument("--norms", default="layernorm,none", help="comma-separated (default: layernorm,none)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds to train (default: 0,1,2)")
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs at a time, 1 thread each "
                        "(default: 2)")
    parser.add_argument("--device", default="cpu", help="train and sample here (default: cpu)")
    parser.add_argument("--steps", help="measure: only these comma-separated checkpoint steps (default: "
                        "every checkpoint not yet measured); perturb: these (default: the last)")
    parser.add_argument("--stats-only", action="store_true", help="measure: only the weight and "
                        "residual-stream statistics (weights.csv, rms.csv), without sampling: seconds per "
                        "checkpoint; a later measure without it adds the errors")
    add_fast_flag(parser)
    parser.add_argument("--results-dir", default="results/paper", help="run folders with the checkpoints "
                        "(default: results/paper)")
    parser.add_argument("--res-dir", default="res/paper", help="measurements, tables and figures "
                        "(default: res/paper)")
    args = parser.parse_args(argv)
    args.norms = list(dict.fromkeys(n.strip() for n in args.norms.split(",") if n.strip()))
    try:
        args.seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    try:
        args.steps = None if args.steps is None else {int(s) for s in args.steps.split(",") if s.strip()}
    except ValueError:
        parser.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if not args.norms or not args.seeds or min(args.seeds) < 0:
        parser.error("--norms and --seeds need at least one entry each (seeds >= 0)")
    args.cfg = PRESETS[args.preset]
    return args


#################################################################################
#                                   Training                                    #
#################################################################################


def run_folder(results_dir, norm, seed):
    """The train_toy.py run folder of (norm, seed), or None before it has started."""
    runs = sorted((Path(results_dir) / f"{norm}-seed{seed}").glob("*-*/config.json"))
    return runs[-1].parent if runs else None


def train_command(args, norm, seed):
    """train_toy.py's command line for (norm, seed): a new run, a resume, or None when it is finished."""
    cfg = args.cfg
    run = run_folder(args.results_dir, norm, seed)
    if run is not None and cfg["max_steps"] in run_checkpoints(run):
        return None
    base = [sys.executable, str(ROOT / "train_toy.py"), "--device", args.device, "--fast", args.fast]
    if run is not None and run_checkpoints(run):
        return [*base, "--resume", str(run), "--max-steps", str(cfg["max_steps"])]
    return [*base, "--model", cfg["model"], "--norm", norm, "--seed", str(seed),
            "--global-batch-size", str(cfg["global_batch_size"]), "--lr", repr(cfg["lr"]),
            "--max-steps", str(cfg["max_steps"]), "--ckpt-every", str(cfg["ckpt_every"]),
            "--log-every", str(min(100, cfg["ckpt_every"])),
            "--results-dir", str(Path(args.results_dir) / f"{norm}-seed{seed}")]


def train(args):
    """Every (norm, seed) run to the end, --jobs at a time, each in its own process with one thread."""
    commands = [c for c in (train_command(args, n, s) for n in args.norms for s in args.seeds) if c]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(cmd):
        return cmd, subprocess.run(cmd, capture_output=True, text=True, env=env)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for cmd, out in pool.map(one, commands):
            last = (out.stderr.strip().splitlines() or out.stdout.strip().splitlines() or [""])[-1]
            print(f"paper: {'finished' if out.returncode == 0 else 'FAILED'} {' '.join(cmd[2:])}: {last}")
            if out.returncode:
                raise SystemExit(1)


#################################################################################
#                                  Measurement                                  #
#################################################################################


def writers(model):
    """The residual stream's writers, name -> weight: the patch embedding, each block's attention and MLP
    output projections and the gate rows of its adaLN (every read of the stream goes through a norm)."""
    width = model.config["hidden_size"]
    out = {"x_embedder": model.x_embedder.proj.weight}
    for i, block in enumerate(model.blocks):
        adaln = block.adaLN_modulation[-1].weight  # (6 D, D): shift, scale, gate of attention, then of MLP
        out[f"block{i}.attn.proj"] = block.attn.proj.weight
        out[f"block{i}.mlp.fc2"] = block.mlp.fc2.weight
        out[f"block{i}.gates"] = torch.cat([adaln[2 * width:3 * width], adaln[5 * width:]])
    return out


def weight_rows(model, raw):
    """Norm of each writer, of all writers together and of all trained weights, and its cosine to raw's."""
    def flat(tensors):
        return torch.cat([t.detach().reshape(-1).double() for t in tensors])

    mine, theirs = writers(model), writers(raw)
    groups = {**{k: [v] for k, v in mine.items()}, "writers": list(mine.values()),
              "all": [p for p in model.parameters() if p.requires_grad]}
    raw_groups = {**{k: [v] for k, v in theirs.items()}, "writers": list(theirs.values()),
                  "all": [p for p in raw.parameters() if p.requires_grad]}
    rows = []
    for name, tensors in groups.items():
        a, b = flat(tensors), flat(raw_groups[name])
        cos = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else math.nan
        rows.append(dict(tensor=name, l2=float(a.norm()), cosine_to_raw=cos))
    return rows


def rms_rows(model, config, batch):
    """The residual stream's RMS after every block, on x_0 = 0 noised to each of RMS_TIMESTEPS."""
    rows = []
    for timestep in RMS_TIMESTEPS:
        generator = torch.Generator().manual_seed(timestep)
        x, t, y = noised_inputs(config, timestep, 0, batch_size=batch, generator=generator)
        for block, out in enumerate(capture_block_outputs(model, x, t, y)):
            rows.append(dict(timestep=timestep, block=block, rms=float(out.double().pow(2).mean().sqrt())))
    return rows


def read_rows(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    """All rows to a csv, in order of step (stable), atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: int(r["step"])))
    tmp.replace(path)


def measure_run(args, norm, seed):
    """Measure every checkpoint of one run not yet measured: its errors (unless --stats-only) and its
    weight and residual-stream statistics, each once; returns the steps measured."""
    torch.set_num_threads(1)
    run = run_folder(args.results_dir, norm, seed)
    if run is None:
        return []
    out = Path(args.res_dir) / "runs" / f"{norm}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.csv" for name in ("errors", "weights", "rms")}
    tables = {name: read_rows(path) for name, path in files.items()}
    done = {name: {int(r["step"]) for r in rows} for name, rows in tables.items()}
    cfg, measured = args.cfg, []
    diffusion = create_diffusion(str(cfg["sampling_steps"]))
    for step, path in sorted(run_checkpoints(run).items()):
        if step == 0 or (args.steps is not None and step not in args.steps):
            continue
        sample = not args.stats_only and step not in done["errors"]
        stats = step not in done["weights"] or step not in done["rms"]
        if not (sample or stats):
            continue
        key = dict(norm=norm, seed=seed, step=step)
        raw, config = load_model(path, weights="raw", device=args.device)
        pixels = {}
        for weights in WEIGHTS:
            model = raw if weights == "raw" else load_model(path, weights=weights, device=args.device)[0]
            if sample:
                generator = torch.Generator().manual_seed(0)  # the fixed noise set
                samples = sample_toy(model, diffusion, cfg["num_samples"], generator=generator,
                                     device=args.device, fast=args.fast, log=print)
                samples = samples.double().cpu().numpy()
                pixels[weights] = np.abs(samples).reshape(len(samples), -1).astype(np.float32)  # (N, C H W)
                errors = error_stats(samples)
                tables["errors"].append({**key, "weights": weights,
                                         **{k: errors[k] for k in ("median", "p99", "max", "mean")}})
            if stats:
                tables["weights"] += [{**key, "weights": weights, **r} for r in weight_rows(model.cpu(),
                                                                                            raw.cpu())]
                tables["rms"] += [{**key, "weights": weights, **r} for r in rms_rows(model.cpu(), config,
                                                                                     cfg["rms_batch"])]
        for name, path_ in files.items():
            if tables[name]:
                write_rows(path_, tables[name])
        if sample and step == cfg["max_steps"]:
            np.savez_compressed(out / "pixels.npz", step=step, **pixels)
        (out / "run.json").write_text(json.dumps(run_info(run), indent=2) + "\n")
        measured.append(step)
        what = "statistics" if not sample else ("errors" if not stats else "errors and statistics")
        print(f"paper: measured {norm} seed {seed} step {step} ({what})", flush=True)
    return measured


def run_info(run):
    """What a reader needs to know of how a run was made (its config.json, without paths)."""
    config = json.loads((run / "config.json").read_text())
    keep = ("train_args", "world_size", "device", "fast", "step_path", "fast_reason", "averages", "torch")
    return {k: config.get(k) for k in keep}


def each_run(args, fn):
    """fn(args, norm, seed) for every (norm, seed), --jobs processes at a time; [((norm, seed), result)]."""
    jobs = [(n, s) for n in args.norms for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        results = pool.map(fn, [args] * len(jobs), [n for n, _ in jobs], [s for _, s in jobs])
        return list(zip(jobs, results, strict=True))


def measure(args):
    for (norm, seed), steps in each_run(args, measure_run):
        print(f"paper: {norm} seed {seed}: {len(steps)} new checkpoint(s) measured")


#################################################################################
#                   Sharpness (exploratory, after the outcome)                  #
#################################################################################

PERTURB_TOWARD = "ema_0.999"
PERTURB_ALPHAS = (0.25, 0.5, 1.0)


def perturb_run(args, norm, seed):
    """Errors at raw + alpha d, for d the step from the raw weights to PERTURB_TOWARD and for d a random
    direction with the same norm per tensor: does an average hurt because it averages, or because any step
    of its size hurts? At the last checkpoint, or at --steps; each step once, into runs/<run>/perturb.csv."""
    torch.set_num_threads(1)
    run = run_folder(args.results_dir, norm, seed)
    if run is None:
        return []
    out = Path(args.res_dir) / "runs" / f"{norm}-seed{seed}" / "perturb.csv"
    rows = read_rows(out)
    done = {int(r["step"]) for r in rows}
    wanted = args.steps if args.steps is not None else {args.cfg["max_steps"]}
    diffusion, new = create_diffusion(str(args.cfg["sampling_steps"])), []
    for step, path in sorted(run_checkpoints(run).items()):
        if step not in wanted or step in done:
            continue
        raw, _ = load_model(path, weights="raw", device=args.device)
        toward = dict(load_model(path, weights=PERTURB_TOWARD, device=args.device)[0].named_parameters())
        generator = torch.Generator().manual_seed(1)
        steps = {}
        for name, p in raw.named_parameters():
            d = (toward[name] - p).detach()
            r = torch.randn(d.shape, generator=generator).to(d)
            steps[name] = {f"toward {PERTURB_TOWARD}": d, "random": r * (d.norm() / r.norm())}
        for direction in (f"toward {PERTURB_TOWARD}", "random"):
            for alpha in PERTURB_ALPHAS:
                model = copy.deepcopy(raw)
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        p.add_(steps[name][direction], alpha=alpha)
                samples = sample_toy(model, diffusion, args.cfg["num_samples"], generator=torch.Generator()
                                     .manual_seed(0), device=args.device, fast=args.fast, log=print)
                stats = error_stats(samples.double().cpu().numpy())
                new.append(dict(norm=norm, seed=seed, step=step, direction=direction, alpha=alpha,
                                **{k: stats[k] for k in ("median", "p99", "max")}))
        out.parent.mkdir(parents=True, exist_ok=True)
        write_rows(out, rows + new)
        print(f"paper: perturbed {norm} seed {seed} step {step}", flush=True)
    return new


def perturb(args):
    each_run(args, perturb_run)


def main(argv=None):
    args = parse_args(argv)
    commands = {"train": train, "measure": measure, "perturb": perturb, "report": paper_report.report}
    commands[args.command](args)


if __name__ == "__main__":
    main()
