"""The MNIST study's measure and report phases: per-run statistics in a long CSV, then the tables.

Each run folder's checkpoints are measured into <stats>/<run>/measures.csv, one row per (step, weights,
quantity) with the count it rests on. Measuring is incremental and survives being killed: a group of
quantities (nll, probe, precision, samples, ablation) is measured for a (step, weights) only if the file
lacks it, and the file is rewritten whole (records.write_atomic) after each group.
"""

from pathlib import Path

import torch

from ditnorm import image_metrics as metrics
from ditnorm.analysis import run_checkpoints
from ditnorm.checkpoint import diffusion_of, load_for_sampling
from ditnorm.classifier import embed, gaussian_fit, load_classifier, save_classifier, train_classifier
from ditnorm.images import load_image_data
from ditnorm.records import RowsError, csv_text, write_atomic
from ditnorm.records import read_rows as read_measured

FIELDS = ("step", "weights", "group", "quantity", "value", "n")
STATS_FILE = "measures.csv"
CLASSIFIER = Path(__file__).resolve().parents[1] / "res" / "mnist" / "classifier.pt"
# What each checkpoint gets, sized for a 2-core CPU: the bound and the probe of the raw weights at every
# other checkpoint (the curves), and at the last one everything of the EMA weights (what one samples
# with) and the precision of the raw weights too.
CURVE = ("nll", "probe")
LAST = {"raw": ("nll", "probe", "precision"), "ema": ("nll", "probe", "precision", "samples", "ablation")}


def read_rows(path):
    """The rows of a measures.csv (values as floats), [] when there is none (records.read_rows)."""
    try:
        return read_measured(path, FIELDS, exact=True, ints=("step", "n"))
    except RowsError as e:
        raise ValueError(f"{e}: not a measures.csv of this study; move it away and measure again") from None


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
    return {"x": heldout_x, "y": heldout_y, "classifier": classifier,
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
        streams = metrics.capture(model, diffusion, x, y)
        middle = range(1, len(streams) - 1) if len(streams) > 2 else range(len(streams))
        block = max(middle, key=lambda b: metrics.stream_stats(streams[b])["ratio"])
        out = metrics.ablation(model, diffusion, x, y, block, metrics.recurring_channels(streams[block]))
        return [(k, float(out[k]), len(x)) for k in ("block", "base", "top", "random", "top_rise",
                                                      "random_rise")]
    raise ValueError(f"unknown group {group!r}")


def plan(steps):
    """{(step, weights): groups} for a run with checkpoints at `steps`: CURVE for the raw weights at every
    other checkpoint counting back from the last, LAST at the last."""
    steps = sorted(steps)
    todo = {(step, "raw"): CURVE for step in steps[-1::-2]}
    todo.update({(steps[-1], kind): groups for kind, groups in LAST.items()})
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
