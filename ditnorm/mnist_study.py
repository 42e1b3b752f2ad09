"""The MNIST study's measure phase: each finished run's checkpoints into <stats>/<run>/measures.csv, one row
per (step, weights, group, quantity) with its count, a group measured only if the file lacks it and the file
rewritten whole after each (so a kill loses nothing); the later groups (docs/instruments.md) are added at
the last checkpoint of runs measured before them."""

from pathlib import Path

import numpy as np
import torch

from ditnorm import ablation as ablations
from ditnorm import image_metrics as metrics
from ditnorm.analysis import run_checkpoints
from ditnorm.checkpoint import diffusion_of, load_for_sampling
from ditnorm.classifier import embed, gaussian_fit, load_classifier, save_classifier, train_classifier
from ditnorm.images import load_image_data
from ditnorm.records import csv_text, write_atomic
from ditnorm.records import read_rows as read_measured

FIELDS = ("step", "weights", "group", "quantity", "value", "n")
STATS_FILE = "measures.csv"
CLASSIFIER = Path(__file__).resolve().parents[1] / "res" / "mnist" / "classifier.pt"
# What each checkpoint gets, sized for a 2-core CPU: the bound and the probe of the raw weights at every
# other checkpoint (the curves), and at the last one everything of the EMA weights (what one samples
# with) and the precision of the raw weights too.
CURVE = ("nll", "probe")
LAST = {"raw": ("nll", "probe", "precision"), "ema": ("nll", "probe", "precision", "samples", "ablation")}
# The instruments that resolve the differences the report reads (issue 36), at the last checkpoint: the
# bound with fresh draws per image, samples over 3 draws with the real-data floor, the ablation that
# separates content from renormalisation, per-input outliers with the stream's two ends.
LAST2 = {"raw": ("nll2", "ablation2", "outliers"), "ema": ("nll2", "samples3", "ablation2", "outliers")}
SAMPLE_DRAWS = 3
# The training images the ablation chooses its block and channels on: this many of each class.
CHOOSE_PER_CLASS = 50


def read_rows(path):
    """The rows of a measures.csv (values as floats), [] when there is none; a RowsError naming a bad file."""
    return read_measured(path, FIELDS, exact=True, ints=("step", "n"))


def write_rows(path, rows):
    """Write rows sorted by (step, weights, group, quantity), atomically (records.write_atomic)."""
    rows = sorted(rows, key=lambda r: (r["step"], r["weights"], r["group"], r["quantity"]))
    write_atomic(path, csv_text([{**r, "value": repr(float(r["value"]))} for r in rows], FIELDS,
                                lineterminator="\n"))


def context(classifier_path=CLASSIFIER):
    """What every measurement shares: the held-out images, the classifier, the training features' fit.

    The classifier is trained (deterministically, one thread) and saved if classifier_path is missing."""
    images = load_image_data("mnist")
    train_x, train_y = images.split("train")
    heldout_x, heldout_y = images.split("heldout")
    path = Path(classifier_path)
    if path.is_file():
        classifier = load_classifier(path)
    else:
        classifier = train_classifier(train_x, train_y)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_classifier(classifier, path)
    train_features, _ = embed(classifier, train_x)
    heldout_features, predicted = embed(classifier, heldout_x)
    chosen = torch.cat([torch.nonzero(train_y == c).flatten()[:CHOOSE_PER_CLASS] for c in range(10)])
    return {"x": heldout_x, "y": heldout_y, "classifier": classifier, "train_features": train_features,
            "choose_x": train_x[chosen], "choose_y": train_y[chosen],
            "reference": gaussian_fit(train_features.numpy()),
            "classifier_accuracy": (predicted == heldout_y).double().mean().item(),
            "heldout_fid": metrics.frechet_distance(gaussian_fit(heldout_features.numpy()),
                                                    gaussian_fit(train_features.numpy()))}


def _group_rows(group, model, diffusion, sampler, ctx, *, per_class, num_inputs):
    """[(quantity, value, n)] of one group measured on one model."""
    x, y = ctx["x"], ctx["y"]
    if group == "nll":
        out = metrics.nll(model, diffusion, x, y)
        return [("nll_bpd", out["nll_bpd"], out["n"]), ("nll_se", out["nll_se"], out["n"])]
    if group == "precision":
        rows = []
        for timestep in (0, 10):
            out = metrics.precision(model, diffusion, x, y, timestep=timestep, num_inputs=num_inputs)
            rows += [(f"t{timestep}_{k}", out[k], out["inputs"])
                     for k in ("bg_p50", "bg_p999", "bg_wrong_level", "all_wrong_level")]
        return rows
    if group == "samples":
        images, labels = metrics.samples(model, sampler, per_class, num_classes=10)
        out = metrics.sample_scores(ctx["classifier"], images, labels, ctx["reference"])
        return [("fid", out["fid"], out["n"]), ("accuracy", out["accuracy"], out["n"])]
    if group == "probe":
        rows = []
        for block, h in enumerate(metrics.capture(model, diffusion, x, y)):
            stats = metrics.stream_stats(h)
            n = h.shape[0] * h.shape[1]
            rows += [(f"block{block}_{k}", float(stats[k]), n)
                     for k in ("top1", "median", "ratio", "massive", "lead_channel", "lead_share",
                               "var_top1", "var_top4")]
            rows += [(f"block{block}_top_channel{i}", float(c), n)
                     for i, c in enumerate(stats["top_channels"])]
        return rows
    if group == "ablation":
        block, channels, _ = ablations.choose(model, diffusion, x, y)  # on the held-out images themselves
        out = metrics.ablation(model, diffusion, x, y, block, channels)
        return [(k, float(out[k]), len(x)) for k in ("block", "base", "top", "random", "top_rise",
                                                      "random_rise")]
    # The later groups' quantities carry their group's name, so that none shares a name (or a report's
    # pattern, such as block<N>_ratio) with an earlier group's.
    return [(f"{group}_{q}", v, n) for q, v, n in _new_group_rows(group, model, diffusion, sampler, ctx,
                                                                   per_class=per_class)]


def _new_group_rows(group, model, diffusion, sampler, ctx, *, per_class):
    """[(quantity, value, n)] of one of LAST2's groups measured on one model."""
    x, y = ctx["x"], ctx["y"]
    if group == "nll2":
        out = metrics.nll_fresh(model, diffusion, x, y)
        rows = [(f"{clip}_{k}", out[clip][k], out[clip]["n"]) for clip in out
                for k in ("nll_bpd", "nll_se", "nll_draw_se")]
        # each held-out image's clipped estimate (the mean of its draws), for the report's test between two
        # models paired over the same images and draws (studies/mnist.paired_nll)
        return rows + [(f"clipped_image{i}", float(v), 1) for i, v in enumerate(out["clipped"]["images"])]
    if group == "samples3":
        draws, pooled = metrics.sample_draws(model, sampler, ctx["classifier"], ctx["reference"], per_class,
                                             draws=SAMPLE_DRAWS)
        rows = [(f"{k}_draw{i}", d[k], d["n"]) for i, d in enumerate(draws) for k in ("fid", "accuracy")]
        rows += [(f"{k}_pooled", pooled[k], pooled["n"]) for k in ("fid", "accuracy")]
        for k in ("fid", "accuracy"):
            values = np.array([d[k] for d in draws])
            rows += [(f"{k}_mean", values.mean(), len(draws)), (f"{k}_sd", values.std(ddof=1), len(draws))]
        size = draws[0]["n"]
        if ("floor", size) not in ctx:  # what real images of the same count score: the same for every run
            ctx["floor", size] = metrics.real_floor(ctx["train_features"], ctx["reference"], size)
        mean, sd = ctx["floor", size]
        return rows + [("floor_heldout", ctx["heldout_fid"], len(x)), ("floor_mean", mean, size),
                       ("floor_sd", sd, size)]
    if group == "ablation2":
        block, channels, channel_mean = ablations.choose(model, diffusion, ctx["choose_x"], ctx["choose_y"])
        out = ablations.ablation_modes(model, diffusion, x, y, block, channels, channel_mean)
        rows = [("block", block, len(ctx["choose_x"]))]
        rows += [(f"channel{i}", c, len(ctx["choose_x"])) for i, c in enumerate(channels)]
        rows.append(("base", out["base"], out["n"]))
        for mode in ablations.MODES:
            rows += [(f"{mode}_{k}", out[f"{mode}_{k}"], out["n"]) for k in ("top_rise", "top_rise_se",
                                                                              "random_rise")]
            rows.append((f"{mode}_random_rise_sd", out[f"{mode}_random_rise_sd"], len(out["random_sets"])))
        return rows
    if group == "outliers":
        rows = []
        for point, h in metrics.capture_points(model, diffusion, x, y).items():
            per_input, pooled = metrics.input_outliers(h), metrics.stream_stats(h)
            rows += [(f"{point}_{k}", per_input[k], per_input["inputs"])
                     for k in ("ratio_p50", "ratio_p90", "ratio_max", "top1_p50", "top1_p90", "median_p50",
                               "massive_share")]
            rows += [(f"{point}_pooled_{k}", float(pooled[k]), h.shape[0] * h.shape[1])
                     for k in ("ratio", "top1", "median", "lead_share", "var_top1")]
        return rows
    raise ValueError(f"unknown group {group!r}")


def plan(steps):
    """{(step, weights): groups} for a run with checkpoints at `steps`: CURVE for the raw weights at every
    other checkpoint counting back from the last, LAST and then LAST2 at the last."""
    steps = sorted(steps)
    todo = {(step, "raw"): CURVE for step in steps[-1::-2]}
    todo.update({(steps[-1], kind): groups + LAST2[kind] for kind, groups in LAST.items()})
    return todo


def measure_run(run_dir, stats_dir, ctx, *, final_step, sample_steps=100, per_class=50, num_inputs=10_000,
                log=print):
    """Measure run_dir's checkpoints by plan() into stats_dir/measures.csv once its checkpoint at
    final_step exists; returns the (step, weights, group) measured now ([] also when the run is
    unfinished)."""
    found = run_checkpoints(run_dir)
    if final_step not in found:
        return []
    path = Path(stats_dir) / STATS_FILE
    rows = read_rows(path)
    done = {(r["step"], r["weights"], r["group"]) for r in rows}
    measured = []
    with torch.no_grad():
        for (step, kind), groups in sorted(plan(found).items()):
            todo = [g for g in groups if (step, kind, g) not in done]
            if todo:
                model, _, train_args = load_for_sampling(found[step], weights=kind, download=False)
                diffusion, sampler = diffusion_of(train_args), diffusion_of(train_args, sample_steps)
            for group in todo:
                values = _group_rows(group, model, diffusion, sampler, ctx, per_class=per_class,
                                     num_inputs=num_inputs)
                rows += [{"step": step, "weights": kind, "group": group, "quantity": q, "value": v, "n": n}
                         for q, v, n in values]
                write_rows(path, rows)
                measured.append((step, kind, group))
                log(f"{Path(run_dir).name} step {step} {kind}: {group}")
    return measured


_CONTEXT = {}


def measure(preset, run, out, options):
    """The mnist preset's measure phase for one run (experiment.py): measure_run once it has finished,
    the shared context built once per process."""
    if "ctx" not in _CONTEXT:
        _CONTEXT["ctx"] = context()
    return measure_run(run["dir"], out, _CONTEXT["ctx"], final_step=run["cfg"]["max_steps"],
                       **preset.get("measure_args", {}))
