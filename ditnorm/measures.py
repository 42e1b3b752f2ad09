"""What the runner measures of each checkpoint of a run: a preset names one of these functions, which takes
(preset, run, out, options), measures every checkpoint of run["dir"] not yet in its files under `out` and
returns the steps measured. A checkpoint's rows are written together, each file whole and atomically, so a
killed run is finished by the next call and never measured twice. sample_errors: the 4-norm study and make
reproduce (errors.csv, outliers.csv); paper_statistics: the paper schedule (errors, weights, rms, perturb
csv, pixels.npz); both the direct statistic (direct.csv: docs/results-notes.md) when measure_args hold it.
"""

import copy
import io
import json
import math

import numpy as np
import torch

from ditnorm import records
from ditnorm.analysis import (
    capture_block_outputs,
    denoiser_x0_errors,
    error_stats,
    fixed_noise_samples,
    ks_uniform,
    noised_inputs,
    outlier_stats,
    pixel_errors,
    run_checkpoints,
)
from ditnorm.averaging import DEFAULT_AVERAGES
from ditnorm.checkpoint import diffusion_of, load_weights_kinds
from ditnorm.data import CONSTANT_RANGE
from ditnorm.files import CheckpointError
from ditnorm.stats import fixed_quantiles


def by_step(row):
    return int(row["step"])


def _wanted(run, steps):
    """{step: path} of the run's checkpoints to consider (all but step 0, or those in steps)."""
    return {s: p for s, p in run_checkpoints(run["dir"]).items() if s > 0 and (steps is None or s in steps)}


DIRECT_COLUMNS = ("data", "measure", "norm", "seed", "step", "weights", "timestep", "noise_seed", "inputs",
                  "p50", "p99", "p99.9", "nonfinite")


def recipe_checkpoints(cfg):
    """The steps a run of this train_run cfg saves: its ckpt_steps, every ckpt_every, and max_steps."""
    steps = {int(s) for s in str(cfg.get("ckpt_steps", "")).split(",") if s.strip()}
    every = int(cfg.get("ckpt_every", 0) or 0)
    steps |= set(range(every, cfg["max_steps"] + 1, every)) if every > 0 else set()
    return sorted(s for s in steps | {cfg["max_steps"]} if 0 < s <= cfg["max_steps"])


def direct_steps(cfg, direct):
    """The checkpoint steps at which the direct statistic is measured: the recipe's last direct["last"]
    (every one when it is None)."""
    steps = recipe_checkpoints(cfg)
    return set(steps if direct.get("last") is None else steps[-direct["last"]:])


def direct_rows(model, train_args, key, direct, device="cpu"):
    """The rows of one model: per timestep of direct["timesteps"], the fixed quantiles of the denoiser's x_0
    error on direct["num_inputs"] inputs of the noise set direct["noise_seed"] + the run's seed. key: data,
    norm, seed, step, weights."""
    noise_seed = direct["noise_seed"] + key["seed"]
    errors = denoiser_x0_errors(model, diffusion_of(train_args), timesteps=direct["timesteps"],
                                num_inputs=direct["num_inputs"], seed=noise_seed, data=key["data"],
                                device=device)
    measure = "abs_x" if key["data"] == "zeros" else "dev_const"
    rows = [dict(key, measure=measure, timestep=t, noise_seed=noise_seed, inputs=direct["num_inputs"],
                 **fixed_quantiles(e), nonfinite=int(e.size - np.isfinite(e).sum()))
            for t, e in errors.items()]
    return [{k: r[k] for k in DIRECT_COLUMNS} for r in rows]


def error_rows(samples, key):
    """The rows of one checkpoint's samples: one per error measure that applies to the run's data."""
    means = samples.reshape(len(samples), -1).mean(axis=1)  # (N,) the sampled constants c
    rows = []
    for measure, errors in pixel_errors(samples).items():
        if key["data"] == "constant" and measure == "abs_x":
            continue  # |x| is no error when the data is not 0
        stats = error_stats(errors)
        rows.append(dict(key, measure=measure, **stats,
                         ks_c=ks_uniform(means, *CONSTANT_RANGE) if key["data"] == "constant" else np.nan))
    return rows


def sample_errors(preset, run, out, options):
    cfg, m = run["cfg"], preset["measure_args"]
    files = {name: out / f"{name}.csv" for name in ("errors", "outliers", "direct")}
    tables = {name: records.read_rows(path) for name, path in files.items()}
    done = {name: {by_step(r) for r in rows} for name, rows in tables.items()}
    at = direct_steps(cfg, m["direct"]) if m.get("direct") else set()
    measured = []
    for step, path in _wanted(run, options["steps"]).items():
        outliers = step == cfg["max_steps"] and step not in done["outliers"]
        direct = step in at - done["direct"]
        if step in done["errors"] and not outliers and not direct:
            continue
        print(f"{run['name']}: measuring step {step}", flush=True)
        models, config, train_args = load_weights_kinds(path, m["weights"], device=options["device"])
        for weights, model in models.items():
            key = dict(data=cfg["data"], norm=cfg["norm"], seed=cfg["seed"], step=step, weights=weights)
            if step not in done["errors"]:
                samples = fixed_noise_samples(model, train_args, m["num_samples"], seed=m["sample_seed"],
                                              sampling_steps=m["sampling_steps"], device=options["device"],
                                              fast=options["fast"], log=print)
                tables["errors"] += [{k: r[k] for k in ERROR_COLUMNS} for r in error_rows(samples, key)]
            if outliers:  # inputs x0 = 0 noised to one timestep, which is also a constant image (c = 0)
                generator = torch.Generator().manual_seed(m["sample_seed"])
                x, t, y = noised_inputs(config, m["outlier_timestep"], 0, batch_size=64, generator=generator,
                                        device=options["device"])
                tables["outliers"] += [dict(key, timestep=m["outlier_timestep"], block=r["layer"],
                                            ratio=r["ratio"])
                                       for r in outlier_stats(capture_block_outputs(model, x, t, y))]
            if direct:
                tables["direct"] += direct_rows(model, train_args, key, m["direct"], options["device"])
        for name, path_ in files.items():
            records.write_rows(path_, tables[name], key=by_step)
        measured.append(step)
    return measured


ERROR_COLUMNS = ("data", "measure", "norm", "seed", "step", "weights", "mean", "median", "p99", "max",
                 "nonfinite", "ks_c")


PAPER_WEIGHTS = ("raw", "ema", *DEFAULT_AVERAGES)
RMS_TIMESTEPS = (10, 100, 500, 900)
PERTURB_TOWARD = "ema_0.999"
PERTURB_ALPHAS = (0.25, 0.5, 1.0)


def writers(model):
    """The residual stream's writers, name -> weight: the patch embedding, each block's attention and MLP
    output projections and the gate rows of its adaLN (every read of the stream goes through a norm)."""
    width = model.config["hidden_size"]
    out = {"x_embedder": model.x_embedder.proj.weight}
    for i, block in enumerate(model.blocks):
        adaln = block.adaLN_modulation[-1].weight  # (6 D, D): shift, scale, gate of attention, then of MLP
        out[f"block{i}.attn.proj"] = block.attn.proj.weight
        out[f"block{i}.mlp.fc2"] = block.mlp.fc2.weight
        out[f"block{i}.gates"] = torch.cat([adaln[2 * width : 3 * width], adaln[5 * width :]])
    return out


def weight_rows(model, raw):
    """Norm of each writer, of all writers together and of all trained weights, and its cosine to raw's."""

    def flat(tensors):
        return torch.cat([t.detach().reshape(-1).double() for t in tensors])

    def groups(m):
        w = writers(m)
        return {**{k: [v] for k, v in w.items()}, "writers": list(w.values()),
                "all": [p for p in m.parameters() if p.requires_grad]}

    rows, theirs = [], groups(raw)
    for name, tensors in groups(model).items():
        a, b = flat(tensors), flat(theirs[name])
        cos = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else math.nan
        rows.append(dict(tensor=name, l2=float(a.norm()), cosine_to_raw=cos))
    return rows


def same_training_by_weights(run_dir, out, checkpoints):
    """Prove that the statistics in `out`, measured before checkpoints.json was kept, are of the training
    whose checkpoints ({step: path}) are on disk: each step of out/weights.csv whose checkpoint is there gives
    back its rows exactly. Returns the steps compared; a CheckpointError at a difference or with none."""
    recorded = records.grouped(records.read_rows(out / "weights.csv"), "step", "weights")
    steps = sorted({int(step) for step, _ in recorded} & set(checkpoints))
    move = f"move {out} away to measure the checkpoints of {run_dir} into a fresh folder"
    if not steps:
        raise CheckpointError(f"{out} holds statistics of checkpoints it did not record, and none of the "
                              f"steps of its weights.csv is on disk to compare; {move}")
    for step in steps:
        kinds = [kind for s, kind in recorded if s == str(step)]
        models, _, _ = load_weights_kinds(checkpoints[step], tuple(dict.fromkeys(("raw", *kinds))))
        for kind in kinds:
            mine = {r["tensor"]: r for r in weight_rows(models[kind], models["raw"])}
            for row in recorded[(str(step), kind)]:
                got = mine.get(row["tensor"], {})
                if any(str(got.get(col)) != row[col] for col in ("l2", "cosine_to_raw")):
                    raise CheckpointError(f"{out} was measured from another training of this run: at step "
                                          f"{step} the checkpoint on disk does not give its weights.csv "
                                          f"({kind}, {row['tensor']}); {move}")
    return steps


def rms_rows(model, config, batch):
    """The residual stream's RMS after every block, on x_0 = 0 noised to each of RMS_TIMESTEPS."""
    rows = []
    for timestep in RMS_TIMESTEPS:
        generator = torch.Generator().manual_seed(timestep)
        x, t, y = noised_inputs(config, timestep, 0, batch_size=batch, generator=generator)
        for block, out in enumerate(capture_block_outputs(model, x, t, y)):
            rows.append(dict(timestep=timestep, block=block, rms=float(out.double().pow(2).mean().sqrt())))
    return rows


def perturbed_rows(raw, toward, sample, key):
    """Errors at raw + alpha d, for d the step from the raw weights to `toward` and for d a random direction
    with the same norm per tensor: does an average hurt because it averages, or because any step of its
    size hurts?"""
    generator, steps = torch.Generator().manual_seed(1), {}
    toward = dict(toward.named_parameters())
    for name, p in raw.named_parameters():
        d = (toward[name] - p).detach()
        r = torch.randn(d.shape, generator=generator).to(d)
        steps[name] = {f"toward {PERTURB_TOWARD}": d, "random": r * (d.norm() / r.norm())}
    rows = []
    for direction in (f"toward {PERTURB_TOWARD}", "random"):
        for alpha in PERTURB_ALPHAS:
            model = copy.deepcopy(raw)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.add_(steps[name][direction], alpha=alpha)
            stats = error_stats(sample(model))
            rows.append(dict(key, direction=direction, alpha=alpha,
                             **{k: stats[k] for k in ("median", "p99", "max")}))
    return rows


def paper_statistics(preset, run, out, options):
    cfg, m = run["cfg"], preset["measure_args"]
    names = ("errors", "weights", "rms", "perturb", "direct")
    files = {name: out / f"{name}.csv" for name in names}
    tables = {name: records.read_rows(path) for name, path in files.items()}
    done = {name: {by_step(r) for r in rows} for name, rows in tables.items()}
    perturb_at = set(m["perturb_steps"].get(cfg["seed"], ()))
    direct_at = direct_steps(cfg, m["direct"]) if m.get("direct") else set()
    measured = []
    for step, path in _wanted(run, options["steps"]).items():
        todo = {"errors": step not in done["errors"], "perturb": step in perturb_at - done["perturb"],
                "stats": step not in done["weights"] or step not in done["rms"],
                "direct": step in direct_at - done["direct"]}
        if not any(todo.values()):
            continue
        every_kind = todo["errors"] or todo["stats"] or todo["direct"]
        kinds = PAPER_WEIGHTS if every_kind else ("raw", PERTURB_TOWARD)
        what = ", ".join(k for k, v in todo.items() if v)
        print(f"{run['name']}: measuring step {step} ({what})", flush=True)
        models, config, train_args = load_weights_kinds(path, kinds, device=options["device"])
        key = dict(norm=cfg["norm"], seed=cfg["seed"], step=step)

        def sample(model, train_args=train_args):
            return fixed_noise_samples(model, train_args, m["num_samples"], seed=0, device=options["device"],
                                       sampling_steps=m["sampling_steps"], fast=options["fast"], log=print)

        pixels = {}
        for weights in kinds if every_kind else ():
            model = models[weights]
            if todo["errors"]:
                samples = sample(model)
                pixels[weights] = np.abs(samples).reshape(len(samples), -1).astype(np.float32)  # (N, C H W)
                e = error_stats(samples)
                tables["errors"].append(dict(key, weights=weights,
                                             **{k: e[k] for k in ("median", "p99", "max", "mean")}))
            if todo["direct"] and weights in m["direct"].get("weights", kinds):  # before the CPU move below
                where = dict(key, data=cfg["data"], weights=weights)
                tables["direct"] += direct_rows(model, train_args, where, m["direct"], options["device"])
            if todo["stats"]:
                tables["weights"] += [dict(key, weights=weights, **r)
                                      for r in weight_rows(model.cpu(), models["raw"].cpu())]
                tables["rms"] += [dict(key, weights=weights, **r)
                                  for r in rms_rows(model.cpu(), config, m["rms_batch"])]

        if todo["perturb"]:
            tables["perturb"] += perturbed_rows(models["raw"], models[PERTURB_TOWARD], sample, key)
        if pixels and step == cfg["max_steps"]:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, step=step, **pixels)
            records.write_atomic(out / "pixels.npz", buffer.getvalue())
        for name in names:
            records.write_rows(files[name], tables[name], key=by_step)
        records.write_atomic(out / "run.json", json.dumps(run_info(run["dir"]), indent=2) + "\n")
        measured.append(step)
    return measured


def run_info(run_dir):
    """What a reader needs to know of how a run was made (its config.json, without paths)."""
    config = json.loads((run_dir / "config.json").read_text())
    keep = ("train_args", "world_size", "device", "fast", "step_path", "fast_reason", "averages", "torch")
    return {k: config.get(k) for k in keep}
