"""The MNIST study's report: tables, exact rank tests and figures from whatever runs/<run>/measures.csv
exist, each number with the count of seeds it rests on."""

import json
import re
from pathlib import Path

# No matplotlib.use("Agg") here: TokenEmbeddingsViz.ipynb imports this module, and forcing Agg there would
# hide its figures (a headless run picks Agg by itself).
import matplotlib.pyplot as plt
import numpy as np

from ditnorm import stats
from ditnorm.analysis import outlier_stats, run_checkpoints
from ditnorm.mnist_study import STATS_FILE, context, read_rows
from ditnorm.records import savefig_atomic, write_atomic
from models import MNIST_MODELS

BLOCK = re.compile(r"block(\d+)_")
RUN_NAME = re.compile(r"(?P<model>.+)-(?P<norm>layernorm|none|rmsnorm|dyt)-seed(?P<seed>\d+)$")
NORMS = ("layernorm", "none", "rmsnorm", "dyt")
PREDICTED_SIZES = ("MnistDiT-XS-4", "MnistDiT-S-4")  # the sizes res/mnist/prediction.md predicts for
# (label, weights, quantity (derived ones: see value), format, which way is better)
FINAL = [
    ("NLL, bits/dim", "ema", "nll_bpd", "{:.3f}", "lower"),
    ("Fréchet distance (digit classifier)", "ema", "fid", "{:.1f}", "lower"),
    ("class accuracy", "ema", "accuracy", "{:.3f}", "higher"),
    ("background error p99.9, t=0, raw", "raw", "t0_bg_p999", "{:.2e}", "lower"),
    ("background error p99.9, t=0, EMA", "ema", "t0_bg_p999", "{:.2e}", "lower"),
    ("background off its level, t=0, raw", "raw", "t0_bg_wrong_level", "{:.2e}", "lower"),
    ("pixels off their level, t=0, EMA", "ema", "t0_all_wrong_level", "{:.3f}", "lower"),
    ("largest middle-block top-1/median, raw", "raw", "middle_ratio", "{:.1f}", "neither"),
    ("largest middle-block top-1/median, EMA", "ema", "middle_ratio", "{:.1f}", "neither"),
    ("share of tokens led by one channel (middle), raw", "raw", "middle_lead_share", "{:.2f}", "neither"),
    ("ablation: top channels' loss rise / random's, EMA", "ema", "ablation_factor", "{:.2f}", "neither"),
]


def load_runs(stats_root):
    """[{model, norm, seed, rows}] of every runs/<run>/measures.csv under stats_root."""
    runs = []
    for path in sorted(Path(stats_root, "runs").glob(f"*/{STATS_FILE}")):
        match = RUN_NAME.match(path.parent.name)
        if match:
            runs.append({"model": match["model"], "norm": match["norm"], "seed": int(match["seed"]),
                         "rows": read_rows(path)})
    return runs


def value(run, step, weights, quantity):
    """One measured value of a run (derived ones computed from the probe and ablation rows), or None."""
    table = {r["quantity"]: r["value"] for r in run["rows"] if r["step"] == step and r["weights"] == weights}
    if quantity in ("middle_ratio", "middle_lead_share"):
        blocks = sorted({int(m[1]) for m in map(BLOCK.match, table) if m})
        middle = blocks[1:-1] or blocks
        key = "ratio" if quantity == "middle_ratio" else "lead_share"
        found = [table.get(f"block{b}_{key}") for b in middle]
        return max(found) if found and None not in found else None
    if quantity == "ablation_factor":
        top, random = table.get("top_rise"), table.get("random_rise")
        return top / random if top is not None and random not in (None, 0) else None
    return table.get(quantity)


def last_step(run):
    return max((r["step"] for r in run["rows"]), default=None)


def spread(values, fmt):
    """'median [min, max] (n=k)' of values."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{fmt.format(values[0])} (n=1)"
    return (f"{fmt.format(np.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}] "
            f"(n={len(values)})")


def rank_test(layernorm, none):
    """stats.rank_test that layernorm's values are larger than none's (exact, ties exact too): (p, pairs
    ordered that way with a tie counted 1/2, all pairs); None below 2 seeds a side."""
    a = [v for v in layernorm if v is not None]
    b = [v for v in none if v is not None]
    if len(a) < 2 or len(b) < 2:
        return None
    test = stats.rank_test(a, b)
    return test.p, f"{test.u:g}", test.n1 * test.n2


def final_table(runs):
    """Markdown: every FINAL statistic per model and norm at each run's last step, with the rank test."""
    lines = []
    for model in sorted({r["model"] for r in runs}):
        group = [r for r in runs if r["model"] == model]
        norms = [n for n in NORMS if any(r["norm"] == n for r in group)]
        lines += [f"**{model}** (last checkpoint of each run; seed median [min, max], n seeds)", "",
                  "| statistic | " + " | ".join(norms)
                  + " | layernorm > none: pairs (a tie counts 1/2), exact one-sided p |",
                  "|---|" + "---|" * len(norms) + "---|"]
        for label, weights, quantity, fmt, better in FINAL:
            by_norm = {norm: [value(r, last_step(r), weights, quantity) for r in group if r["norm"] == norm]
                       for norm in norms}
            cells = [spread(by_norm[norm], fmt) for norm in norms]
            test = rank_test(by_norm.get("layernorm", []), by_norm.get("none", []))
            cell = f"{test[1]}/{test[2]}, p = {test[0]:.2f}" if test else "n < 2"
            said = "" if better == "neither" else f" ({better} is better)"
            lines.append(f"| {label}{said} | " + " | ".join(cells) + f" | {cell} |")
        lines.append("")
    return "\n".join(lines)


def block_table(runs, weights="raw"):
    """Markdown: per model, norm and block, the seed median of top-1/median, lead share and the top-1
    variance share at the last step."""
    lines = [f"| model | norm | block | top-1/median | top-1 | tokens led by one channel | variance in top "
             f"channel | massive ({weights}) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for model in sorted({r["model"] for r in runs}):
        for norm in NORMS:
            group = [r for r in runs if r["model"] == model and r["norm"] == norm]
            if not group:
                continue
            depth = len({q for r in group for q in (x["quantity"] for x in r["rows"]) if q.endswith("_ratio")
                         and q.startswith("block")})
            for b in range(depth):
                by_stat = {k: [value(r, last_step(r), weights, f"block{b}_{k}") for r in group]
                           for k in ("ratio", "top1", "lead_share", "var_top1", "massive")}
                med = {k: np.median([v for v in vs if v is not None]) if any(v is not None for v in vs)
                       else float("nan") for k, vs in by_stat.items()}
                lines.append(f"| {model} | {norm} | {b} | {med['ratio']:.1f} | {med['top1']:.3g} "
                             f"| {med['lead_share']:.2f} | {med['var_top1']:.2f} "
                             f"| {'yes' if med['massive'] > 0 else 'no'} (n={len(group)}) |")
    return "\n".join(lines)


def _seeds(runs, model, norm, weights, quantity):
    """One value per seed of model with norm: quantity at its last checkpoint."""
    found = [value(r, last_step(r), weights, quantity) for r in runs
             if (r["model"], r["norm"]) == (model, norm)]
    return [v for v in found if v is not None]


def prediction_outcome(runs):
    """Markdown: the outcome of res/mnist/prediction.md's P1-P7 on these runs, per model size; a
    prediction about sizes the runs cannot yet settle says what is missing."""
    sizes = [m for m in (*PREDICTED_SIZES, *sorted({r["model"] for r in runs} - set(PREDICTED_SIZES)))
             if _seeds(runs, m, "layernorm", "raw", "nll_bpd") and _seeds(runs, m, "none", "raw", "nll_bpd")]
    missing = [m for m in PREDICTED_SIZES if m not in sizes]
    lines = ["## Outcome of the predictions (`prediction.md`)", ""]
    if not sizes:
        return "\n".join(lines + ["No size has layernorm and none runs yet.", ""])

    def per_size(name, statement, weights, quantity, verdict):
        """verdict(layernorm's seed values, none's) -> (holds, what it rests on), for every size."""
        parts = []
        for model in sizes:
            a, b = (_seeds(runs, model, norm, weights, quantity) for norm in ("layernorm", "none"))
            if not a or not b:
                parts.append(f"{model}: not measured ({quantity}, {weights} weights)")
                continue
            ok, said = verdict(a, b)
            parts.append(f"{model}: {'not settled' if ok is None else 'holds' if ok else 'fails'} ({said})")
        tail = f"; not yet measured at {', '.join(missing)}" if missing else ""
        lines.append(f"- **{name}** {statement}: " + "; ".join(parts) + tail + ".")

    def separated(fmt):
        def verdict(a, b):  # layernorm above none, at the p that 3 seeds against 3 allow at best
            test = rank_test(a, b)
            if test is None:  # one seed a side: nothing to test yet
                return None, f"n = {len(a)} and {len(b)} seeds, no test"
            p, pairs, total = test
            medians = " vs ".join(fmt.format(np.median(v)) for v in (a, b))
            said = f"seed medians {medians}, {pairs}/{total} pairs, p = {p:.2f}, n = {len(a)} vs {len(b)}"
            smallest = stats.smallest_p(len(a), len(b))
            if smallest > 0.05 + 1e-9:  # these seed counts cannot reach p = 0.05 (2 vs 2: 0.17)
                return None, f"{said}; the smallest p {len(a)} vs {len(b)} seeds allow is {smallest:.2f}"
            return p <= 0.05 + 1e-9, said
        return verdict

    per_size("P1", "every layernorm seed's largest middle-block top-1/median above every none seed's, raw",
             "raw", "middle_ratio", separated("{:.1f}"))
    massive = [(r["model"], r["norm"], r["seed"]) for r in runs for weights in ("raw", "ema")
               for q in {x["quantity"] for x in r["rows"] if BLOCK.match(x["quantity"])
                         and x["quantity"].endswith("_massive")}
               if (value(r, last_step(r), weights, q) or 0) > 0]
    largest = max(_all(runs, "middle_ratio"), default=float("nan"))
    lines.append(f"- **P2** no massive activation (top-1 > 100 and >= 1000x the median) in any block: "
                 f"{'fails: ' + str(massive) if massive else 'holds'} ({len(runs)} runs, raw and EMA, last "
                 f"checkpoint; largest middle-block top-1/median {largest:.1f}).")
    per_size("P3", "one channel leads more than half of a middle block's tokens in every layernorm run and "
             "in no none run", "raw", "middle_lead_share",
             lambda a, b: (min(a) > 0.5 >= max(b), f"largest middle-block share, layernorm {min(a):.2f}-"
                                                   f"{max(a):.2f}, none {min(b):.2f}-{max(b):.2f}"))
    per_size("P4", "zeroing the recurring channels raises the held-out loss >= 2x more than random ones in "
             "every layernorm run, less without a norm", "ema", "ablation_factor",
             lambda a, b: (min(a) >= 2 and np.median(b) < np.median(a),
                           f"layernorm {min(a):.2f}-{max(a):.2f}, none median {np.median(b):.2f}, EMA"))
    xs, small = (_seeds(runs, m, "layernorm", "raw", "middle_ratio") for m in PREDICTED_SIZES)
    if xs and small:
        a, b = np.median(small), np.median(xs)
        lines.append(f"- **P5** the layernorm seed median of P1's statistic larger at S than at XS: "
                     f"{'holds' if a > b else 'fails'} ({a:.1f} vs {b:.1f}, n = {len(small)} and {len(xs)}).")
    else:
        lines.append(f"- **P5** (larger at S than at XS): not settled, {', '.join(missing)} not measured "
                     "yet.")
    per_size("P6", "background error p99.9 at t = 0 lower without the norm, raw, p = 0.05 (over 1e4 noisy "
             "inputs, not the 1e5 the prediction named)", "raw", "t0_bg_p999", separated("{:.2e}"))
    per_size("P7", "held-out NLL of none within 5% of layernorm's", "ema", "nll_bpd",
             lambda a, b: (abs(np.median(b) / np.median(a) - 1) <= 0.05,
                           f"EMA seed medians {np.median(a):.3f} and {np.median(b):.3f}, none "
                           f"{100 * (np.median(b) / np.median(a) - 1):+.1f}%"))
    return "\n".join(lines + [""])


def _all(runs, quantity):
    return [v for r in runs for w in ("raw", "ema") if (v := value(r, last_step(r), w, quantity)) is not None]


def training_table(runs):
    """Markdown: per model and norm, the seed median [min, max] of the held-out NLL and of the largest
    middle-block top-1/median (raw weights) at every checkpoint measured in all its runs."""
    lines = ["## Over training (raw weights; seed median [min, max], n seeds)", "",
             "| model | norm | step | NLL, bits/dim | largest middle-block top-1/median |",
             "|---|---|---:|---|---|"]
    for model in sorted({r["model"] for r in runs}):
        for norm in NORMS:
            group = [r for r in runs if (r["model"], r["norm"]) == (model, norm)]
            measured = [{x["step"] for x in r["rows"] if x["weights"] == "raw"} for r in group]
            steps = set.intersection(*measured) if measured else set()
            for step in sorted(steps):
                cells = [spread([value(r, step, "raw", q) for r in group], fmt)
                         for q, fmt in (("nll_bpd", "{:.3f}"), ("middle_ratio", "{:.1f}"))]
                lines.append(f"| {model} | {norm} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def curves_figure(runs, path):
    """NLL and the largest middle-block top-1/median of the raw weights against the step, per run."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"layernorm": "tab:orange", "none": "tab:blue", "rmsnorm": "tab:green", "dyt": "tab:purple"}
    styles = {m: s for m, s in zip(sorted({r["model"] for r in runs}), ("-", "--", ":", "-."), strict=False)}
    for run in runs:
        steps = sorted({r["step"] for r in run["rows"] if r["weights"] == "raw"})
        for ax, quantity in zip(axes, ("nll_bpd", "middle_ratio"), strict=True):
            points = [(s, value(run, s, "raw", quantity)) for s in steps]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                label = f"{run['model']} {run['norm']}" if run["seed"] == 0 else None
                ax.plot(*zip(*points, strict=True), styles[run["model"]], color=colors[run["norm"]],
                        marker=".", alpha=0.8, label=label)
    axes[0].set(xlabel="step", ylabel="held-out NLL bound, bits/dim (raw)")
    axes[1].set(xlabel="step", ylabel="largest middle-block top-1/median (raw)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=120)
    plt.close(fig)


def report(stats_root, out_dir=None, title="MNIST study: results", reference=None):
    """Write results.md and curves.png into out_dir (default stats_root); returns results.md's text.
    reference: mnist_study.context()'s classifier_accuracy and heldout_fid, said in the header if given."""
    out_dir = Path(out_dir or stats_root)
    runs = load_runs(stats_root)
    counts = ", ".join(f"{m} {n}: {sum(r['model'] == m and r['norm'] == n for r in runs)}"
                       for m in sorted({r["model"] for r in runs}) for n in NORMS
                       if any(r["model"] == m and r["norm"] == n for r in runs))
    text = "\n".join([
        f"# {title}", "",
        f"Runs measured (seeds): {counts or 'none yet'}. Exact one-sided Mann-Whitney tests between "
        "layernorm and none over seeds: with 3 seeds against 3 the smallest possible p is 0.05.", "",
        *([f"The yardsticks (`res/mnist/classifier.pt` on the {reference['heldout']} held-out digits): the "
           f"classifier names the class of {reference['classifier_accuracy']:.3f} of them, and their own "
           f"Fréchet distance to the training digits is {reference['heldout_fid']:.1f}, about where a "
           "perfect sampler's 500 samples would land.", ""] if reference else []),
        final_table(runs), prediction_outcome(runs),
        "## Residual stream per block (last checkpoint, raw weights, seed medians)", "",
        block_table(runs), "", training_table(runs)])
    if runs:
        curves_figure(runs, out_dir / "curves.png")
    write_atomic(out_dir / "results.md", text)
    return text


def preset_report(preset, record, options):
    """The mnist preset's report phase (experiment.py): report() on record/runs/ into record, and
    TokenEmbeddingsViz.ipynb's side-by-side figure of the largest seed-0 pair (mnist_token_embeddings.png,
    token_outliers.md; its pretrained and toy parts skipped)."""
    from ditnorm import notebooks

    ctx = context()
    text = report(record, record, reference=dict(heldout=len(ctx["y"]), heldout_fid=ctx["heldout_fid"],
                                                 classifier_accuracy=ctx["classifier_accuracy"]))
    runs_dir = Path(options["runs_dir"])
    try:
        last_pair(runs_dir)
    except FileNotFoundError as e:
        print(f"SKIPPED the notebook: {e}")
        return text
    params = dict(checkpoint="", mnist_dir=notebooks.shown(runs_dir), results_dir=notebooks.shown(runs_dir),
                  out_dir=notebooks.shown(record), mnist_shipped="", toy_shipped="")  # this study's runs only
    notebooks.execute_notebook(notebooks.ROOT / "TokenEmbeddingsViz.ipynb", params,
                               runs_dir / "executed" / "TokenEmbeddingsViz.ipynb")
    return text


def last_pair(runs_dir, model=None, seed=0, shipped=""):
    """({"layernorm": checkpoint, "none": checkpoint}, model) at the last checkpoint step that the layernorm
    and none runs of `seed` share under runs_dir: of the largest MNIST model (or `model`) whose pair has
    finished (a checkpoint at the max_steps of its config.json), else of the largest with any common step;
    else the same of the weights folder `shipped` (pretrained.py), when given; FileNotFoundError if there
    is none."""
    pairs = []
    for name in [model] if model else reversed(MNIST_MODELS):
        dirs = {norm: Path(runs_dir) / f"{name.replace('/', '-')}-{norm}-seed{seed}"
                for norm in ("layernorm", "none")}
        found = {norm: run_checkpoints(folder) for norm, folder in dirs.items()}
        common = set(found["layernorm"]) & set(found["none"])
        if common:
            pair = {norm: found[norm][max(common)] for norm in found}
            if all(_max_steps(folder) in common for folder in dirs.values()):
                return pair, name
            pairs.append((pair, name))
    if pairs:
        return pairs[0]
    if shipped and Path(shipped).is_dir():
        return last_pair(shipped, model, seed)
    raise FileNotFoundError(f"no layernorm and none runs of seed {seed} with a common checkpoint under "
                            f"{runs_dir}; train them with python experiment.py train --preset mnist")


def _max_steps(run_dir):
    """The max_steps a run folder's config.json names, or None."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())["train_args"]["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plot_streams_side_by_side(streams, tokens, *, sample=0, title=""):
    """|value| against channel of the residual stream after each block, one column per model in
    `streams` ({label: depth tensors (N, T, D)}), the given tokens of one sample overlaid; each row's
    label gives that model's top-1 and top-1/median over all samples and tokens."""
    labels = list(streams)
    depth = max(len(v) for v in streams.values())
    fig, axes = plt.subplots(depth, len(labels), figsize=(4.2 * len(labels), 1.1 * depth + 1.0),
                             sharex=True, squeeze=False)
    for col, label in enumerate(labels):
        stats = outlier_stats(streams[label])
        for block, h in enumerate(streams[label]):
            ax = axes[block, col]
            for token in tokens:
                ax.plot(h[sample, token].abs().numpy(), linewidth=0.6, alpha=0.8)
            ax.tick_params(labelsize=6)
            top1, ratio = stats[block]["top1"], stats[block]["ratio"]
            ax.set_ylabel(f"block {block}\nmax {top1:.3g}\nx{ratio:.3g} med", fontsize=6, rotation=0,
                          ha="right", va="center")
        axes[0, col].set_title(label, fontsize=9)
        axes[-1, col].set_xlabel("channel", fontsize=7)
    shown = ", ".join(map(str, tokens))
    fig.suptitle(f"{title}\n|value| of the residual stream after each block, tokens {shown}", fontsize=9)
    fig.tight_layout()
    return fig
