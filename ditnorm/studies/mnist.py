"""The MNIST study's report: tables, exact rank tests and figures from whatever runs/<run>/measures.csv
exist, each number with the count of seeds it rests on."""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ditnorm import figures, layout, records, stats, tables  # noqa: E402
from ditnorm.mnist_study import STATS_FILE, context, read_rows  # noqa: E402
from ditnorm.records import write_atomic  # noqa: E402
from models import MNIST_MODELS  # noqa: E402

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


def load_runs(stats_root, grid=None):
    """[{model, norm, seed, ..., rows}] of every runs/<run>/measures.csv under stats_root. A run of grid
    ({run name: train_run cfg}, a preset's runs) carries every key of its cfg (an intervention axis too);
    any other is known by its name, <model>-<norm>-seed<k>."""
    runs = []
    for path in layout.measured_files(stats_root, STATS_FILE):
        cfg, match = (grid or {}).get(path.parent.name), RUN_NAME.match(path.parent.name)
        if cfg:
            runs.append({**cfg, "model": cfg["model"].replace("/", "-"), "run": path.parent.name,
                         "rows": read_rows(path)})
        elif match:
            runs.append({"model": match["model"], "norm": match["norm"], "seed": int(match["seed"]),
                         "rows": read_rows(path)})
    return runs


# Derived quantities: the largest of the middle blocks' (every block but the first and the last) values of
# <prefix><block>_<key>, and the ratio of a top-channel ablation's loss rise to the random channels'.
MIDDLE = {"middle_ratio": ("block", "ratio"), "middle_lead_share": ("block", "lead_share"),
          "middle_input_ratio": ("outliers_block", "ratio_p50"),
          "middle_pooled_ratio": ("outliers_block", "pooled_ratio")}
FACTORS = {"ablation_factor": "", "zero_factor": "ablation2_zero_", "stats_factor": "ablation2_stats_"}


def value(run, step, weights, quantity):
    """One measured value of a run (MIDDLE and FACTORS derived from its rows), or None."""
    table = {r["quantity"]: r["value"] for r in run["rows"] if r["step"] == step and r["weights"] == weights}
    if quantity in MIDDLE:
        prefix, key = MIDDLE[quantity]
        blocks = sorted({int(m[1]) for m in (re.match(rf"{prefix}(\d+)_", q) for q in table) if m})
        found = [table.get(f"{prefix}{b}_{key}") for b in blocks[1:-1] or blocks]
        return max(found) if found and None not in found else None
    if quantity in FACTORS:
        top, random = (table.get(f"{FACTORS[quantity]}{k}") for k in ("top_rise", "random_rise"))
        return top / random if top is not None and random not in (None, 0) else None
    return table.get(quantity)


def last_step(run):
    return max((r["step"] for r in run["rows"]), default=None)


def by_model_norm(runs):
    """[(model, norm, its runs)] by model name, then in NORMS' order; none without runs."""
    return [(m, n, group) for m in sorted({r["model"] for r in runs}) for n in NORMS
            if (group := [r for r in runs if (r["model"], r["norm"]) == (m, n)])]


CURVES = {"nll_bpd": "NLL, bits/dim", "middle_ratio": "largest middle-block top-1/median"}


def _said(label, better):
    return label if better == "neither" else f"{label} ({better} is better)"


def final_table(runs):
    """Markdown: every FINAL statistic per model and norm at each run's last step, with the rank test and
    Holm's adjustment over the table's lines; then, where two or more sizes have layernorm and none, the
    test stratified over the sizes (tables.strata_cells)."""
    rows = [dict(statistic=_said(label, better), model=r["model"], norm=r["norm"], seed=r["seed"],
                 value=value(r, last_step(r), weights, quantity))
            for label, weights, quantity, _, better in FINAL for r in runs]
    formats = {_said(label, better): fmt for label, _, _, fmt, better in FINAL}
    models = sorted({r["model"] for r in runs})
    lines = []
    for model in models:
        norms = tuple(n for n in NORMS if any(r["norm"] == n and r["model"] == model for r in runs))
        declared = tables.Table(lines=("statistic",), order=norms, fmt=formats, lone=True, holm=True,
                                p_fmt=".2f", test_cells=tables.pairs_cell, test_align="---",
                                test_heads=("layernorm > none: pairs (a tie counts 1/2), exact one-sided p",))
        lines += [f"**{model}** (last checkpoint of each run; seed median [min, max], n seeds)", "",
                  *tables.render(declared, [r for r in rows if r["model"] == model]), ""]
    pooled = [m for m in models if {"layernorm", "none"} <= {r["norm"] for r in runs if r["model"] == m}]
    if len(pooled) > 1:
        declared = tables.Table(lines=("statistic",), across=("model", "norm"), strata="model",
                                order=tuple((m, n) for m in pooled for n in ("layernorm", "none")),
                                fmt=formats, lone=True, holm=True, p_fmt=".4f",
                                test_cells=tables.strata_cells, test_heads=tables.STRATA_HEADS)
        lines += [f"**The sizes pooled** ({', '.join(pooled)}): the pairs with layernorm above none summed "
                  "over the sizes, and the exact one-sided p of that sum over every relabelling of the seeds "
                  "within each size (a stratified permutation test; 3 against 3 at two sizes: smallest p "
                  "1/400), with Holm's adjustment over the table's lines beside it.", "",
                  *tables.render(declared, [r for r in rows if r["model"] in pooled]), ""]
    return "\n".join(lines)


def block_table(runs, weights="raw"):
    """Markdown: per model, norm and block, the seed median of top-1/median, lead share and the top-1
    variance share at the last step."""
    lines = [f"| model | norm | block | top-1/median | top-1 | tokens led by one channel | variance in top "
             f"channel | massive ({weights}) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for model, norm, group in by_model_norm(runs):
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
            if len(a) < 2 or len(b) < 2:  # one seed a side: nothing to test yet
                return None, f"n = {len(a)} and {len(b)} seeds, no test"
            test = stats.rank_test(a, b)
            p = test.p
            medians = " vs ".join(fmt.format(np.median(v)) for v in (a, b))
            said = (f"seed medians {medians}, {test.u:g}/{test.n1 * test.n2} pairs, p = {p:.2f}, "
                    f"n = {len(a)} vs {len(b)}")
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
    largest = max((v for r in runs for w in ("raw", "ema")
                   if (v := value(r, last_step(r), w, "middle_ratio")) is not None), default=float("nan"))
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


def training_table(runs):
    """Markdown: per model and norm, the seed median [min, max] of the held-out NLL and of the largest
    middle-block top-1/median (raw weights) at every checkpoint measured in all its runs."""
    rows = []
    for model, norm, group in by_model_norm(runs):
        measured = set.intersection(*({x["step"] for x in r["rows"] if x["weights"] == "raw"} for r in group))
        rows += [dict(model=model, norm=norm, step=step, seed=r["seed"], statistic=q,
                      value=value(r, step, "raw", q))
                 for step in sorted(measured) for r in group for q in CURVES]
    declared = tables.Table(lines=("model", "norm", "step"), across="statistic", order=tuple(CURVES),
                            names=CURVES, test=None, fmt={"nll_bpd": "{:.3f}", "middle_ratio": "{:.1f}"},
                            lone=True, right=("step",))
    return "\n".join(["## Over training (raw weights; seed median [min, max], n seeds)", "",
                      *tables.render(declared, rows), ""])


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
    figures.save(fig, path)


def report(stats_root, out_dir=None, title="MNIST study: results", reference=None, grid=None):
    """Write results.md and curves.png into out_dir (default stats_root); returns results.md's text.
    reference: yardsticks(), said in the header if given; grid: as load_runs'."""
    out_dir = Path(out_dir or stats_root)
    runs = load_runs(stats_root, grid)
    counts = ", ".join(f"{m} {n}: {len(group)}" for m, n, group in by_model_norm(runs))
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


YARDSTICKS = "yardsticks.csv"


def yardsticks(record):
    """{heldout, classifier_accuracy, heldout_fid} from record/yardsticks.csv (statistic, value, n); the
    file is written from mnist_study.context() (MNIST and the classifier loaded) only when it is missing."""
    path = Path(record) / YARDSTICKS
    if not path.is_file():
        ctx = context()
        records.write_rows(path, [dict(statistic=k, value=repr(ctx[k]), n=len(ctx["y"]))
                          for k in ("classifier_accuracy", "heldout_fid")])
    rows = records.read_rows(path, ("statistic", "value", "n"), ints=("n",))
    return dict(heldout=rows[0]["n"], **{r["statistic"]: r["value"] for r in rows})


def preset_report(preset, record, options):
    """The mnist preset's report phase (experiment.py): report() on record/runs/ into record, and
    TokenEmbeddingsViz.ipynb's side-by-side figure of the largest seed-0 pair (mnist_token_embeddings.png,
    token_outliers.md; its pretrained and toy parts skipped)."""
    from ditnorm import notebooks

    text = report(record, record, reference=yardsticks(record), grid=dict(options["runs"]))
    runs_dir = Path(options["runs_dir"])
    try:
        layout.last_pair(runs_dir, MNIST_MODELS)
    except FileNotFoundError as e:
        print(f"SKIPPED the notebook: {e}")
        return text
    params = dict(checkpoint="", mnist_dir=notebooks.shown(runs_dir), results_dir=notebooks.shown(runs_dir),
                  out_dir=notebooks.shown(record), mnist_shipped="", toy_shipped="")  # this study's runs only
    notebooks.execute_notebook(notebooks.ROOT / "TokenEmbeddingsViz.ipynb", params,
                               runs_dir / "executed" / "TokenEmbeddingsViz.ipynb")
    return text


# The interventions study (res/interventions/prediction.md).

# (label, weights, quantity; derived ones: see value), format: the instruments of issue 36
INTERVENED = [
    ("NLL, bits/dim, x_0 clipped (EMA)", "ema", "nll2_clipped_nll_bpd", ".3f"),
    ("its standard error over images (EMA)", "ema", "nll2_clipped_nll_se", ".4f"),
    ("Fréchet distance, mean of 3 draws (EMA)", "ema", "samples3_fid_mean", ".1f"),
    ("class accuracy, mean of 3 draws (EMA)", "ema", "samples3_accuracy_mean", ".3f"),
    ("background error p99.9, t = 0 (raw)", "raw", "t0_bg_p999", ".2e"),
    ("middle-block top-1/median, per-input median (raw)", "raw", "middle_input_ratio", ".1f"),
    ("middle-block top-1/median, pooled (raw)", "raw", "middle_pooled_ratio", ".1f"),
    ("input to block 0, top-1/median per-input median (raw)", "raw", "outliers_input_ratio_p50", ".1f"),
    ("final layer's input, top-1/median per-input median (raw)", "raw", "outliers_final_ratio_p50", ".1f"),
    ("loss rise, top channels zeroed / random (EMA)", "ema", "zero_factor", ".2f"),
    ("loss rise, norm statistics kept / random (EMA)", "ema", "stats_factor", ".2f"),
]


# The figure of the interventions: what they aim to remove, and what LayerNorm pays, per condition.
FIGURE = ("middle-block top-1/median, per-input median (raw)", "NLL, bits/dim, x_0 clipped (EMA)")
CONDITIONS = ("baseline", "wd0.1", "wd1", "dropout0.3", "cap4")  # the figure's order


def intervention_figure(rows, conditions, path):
    """FIGURE's statistics per condition, layernorm and none side by side, each seed's run a dot, and the
    seed-paired difference layernorm - none of the last."""
    fig, axes = plt.subplots(1, len(FIGURE) + 1, figsize=(15, 3.6))
    colors, paired = {"layernorm": "tab:orange", "none": "tab:blue"}, "layernorm - none, same seed"
    for ax, label in zip(axes, FIGURE, strict=False):
        values = {(r["intervention"], r["norm"], r["seed"]): r["value"] for r in rows
                  if r["statistic"] == label and r["value"] is not None}
        groups = {c: {n: [v for (c_, n_, _), v in values.items() if (c_, n_) == (c, n)] for n in colors}
                  for c in conditions}
        figures.seed_dots(ax, groups, colors)
        ax.set_title(label, fontsize=9)
    diffs = {c: {paired: [v - values[c, "none", s] for (c_, n, s), v in values.items()
                          if (c_, n) == (c, "layernorm") and (c, "none", s) in values]} for c in conditions}
    figures.seed_dots(axes[-1], diffs, {paired: "tab:gray"})
    axes[-1].axhline(0, color="0.5", linewidth=0.6)
    axes[-1].set_title(f"{FIGURE[-1]}: {paired}", fontsize=9)
    for ax in axes[::2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("MnistDiT-XS/4 at 10k steps under each condition: a dot per seed, a line at the median",
                 fontsize=9)
    figures.save(fig, path)


def interventions_report(preset, record, options):
    """results.md of the interventions preset: per statistic and condition, layernorm against none over seeds
    (Holm over the table's lines), and each condition's seed-paired difference layernorm - none against
    baseline's (the read-out of res/interventions/prediction.md)."""
    grid = dict(options["runs"])
    runs = [r for r in load_runs(record, grid) if r["rows"]]
    conditions = list(dict.fromkeys(name.split("-")[-2] for name in grid))  # <model>-<norm>-<it>-seed<k>
    for r in runs:
        r["intervention"] = r["run"].split("-")[-2]
    rows = [dict(statistic=label, intervention=r["intervention"], norm=r["norm"], seed=r["seed"],
                 value=value(r, last_step(r), weights, quantity))
            for label, weights, quantity, _ in INTERVENED for r in runs]
    formats = {label: fmt for label, _, _, fmt in INTERVENED}
    main = tables.Table(lines=("statistic", "intervention"), order=("layernorm", "none"), fmt=formats,
                        lone=True, holm=True)
    differences = []
    for label, *_ in INTERVENED:
        paired = {}
        for r in rows:
            if r["statistic"] == label and r["value"] is not None:
                paired.setdefault((r["intervention"], r["seed"]), {})[r["norm"]] = r["value"]
        d = {key: v["layernorm"] - v["none"] for key, v in paired.items() if len(v) == 2}
        for (condition, seed), diff in d.items():
            if condition != "baseline":  # its seed's difference, then baseline's of the same seed
                differences += [dict(statistic=label, intervention=condition, side=side, seed=seed, value=v)
                                for side, v in (("under it", diff), ("baseline", d.get(("baseline", seed))))
                                if v is not None]
    interaction = tables.Table(lines=("statistic", "intervention"), across="side",
                               order=("under it", "baseline"), test=("under it", "baseline"), fmt=".3g",
                               lone=True, holm=True, test_cells=tables.pairs_cell, test_align="---",
                               test_heads=("under it > baseline: pairs, exact one-sided p",))
    counts = ", ".join(f"{c} {n}: {sum(r['intervention'] == c and r['norm'] == n for r in runs)}"
                       for c in conditions for n in ("layernorm", "none")
                       if any(r["intervention"] == c and r["norm"] == n for r in runs))
    text = "\n".join([
        "# When does LayerNorm hurt a DiT? The interventions: results", "",
        f"MnistDiT-XS/4 at its last checkpoint (10k steps); runs measured (seeds): {counts or 'none yet'}. "
        "The predictions (`prediction.md`) were committed before any run. A cell is the seed median "
        "[min, max] (n seeds); the tests are exact one-sided rank tests over seeds (3 against 3: smallest "
        "p 0.05), with Holm's adjustment over each table's lines beside them.", "",
        *([f"![{FIGURE[0]} and {FIGURE[1]} per condition, layernorm and none, a dot per seed; right: the "
           "seed-paired difference of the NLL](intervention.png)", ""] if runs else []),
        "## LayerNorm against no norm under each condition", "", *tables.render(main, rows), "",
        "## The read-out: the seed-paired difference layernorm - none under a condition against baseline's",
        "", "A difference above baseline's means the condition moved LayerNorm up relative to no norm "
        "(worse, for the quality lines; more concentrated, for the outlier lines).", "",
        *(tables.render(interaction, differences) if differences else
          ["No condition has a seed whose layernorm and none runs and baseline pair are all measured yet."]),
        "", "## The NLL difference of each seed pair, paired over the held-out images", "",
        "The clipped bound of the EMA weights (the first table's first line), each held-out image's estimate "
        "of one model minus the other's: both models see the same 500 images, timesteps and noise, so the "
        "images' own spread, most of each model's standard error, cancels. These standard errors say "
        "whether two trained models differ on these images; whether the norms differ is the seeds' test "
        "above.", "", *paired_nll_lines(paired_nll(runs), conditions), ""])
    if runs:
        order = sorted(conditions, key=lambda c: CONDITIONS.index(c) if c in CONDITIONS else len(CONDITIONS))
        intervention_figure(rows, order, Path(record) / "intervention.png")
    write_atomic(Path(record) / "results.md", text)
    return text


def paired_nll(runs):
    """The clipped EMA bound's difference layernorm - none of each measured seed pair, paired over the
    held-out images (the same images, timesteps and noise for both: image_metrics.nll_fresh), and that
    difference under a condition minus baseline's, paired the same way: [{intervention, seed, diff, se,
    model_se, against_baseline, against_se}] (the last two None for baseline or without its pair). The
    standard errors are over images and draws: they say whether these trained models differ on these
    images, not whether the norms do (the seeds' rank test does)."""
    images = {}
    for r in runs:
        step = last_step(r)
        table = {x["quantity"]: x["value"] for x in r["rows"] if x["step"] == step and x["weights"] == "ema"}
        count = sum(q.startswith("nll2_clipped_image") for q in table)
        if count:
            images.setdefault((r["intervention"], r["seed"]), {})[r["norm"]] = (
                np.array([table[f"nll2_clipped_image{i}"] for i in range(count)]),
                table.get("nll2_clipped_nll_se"))
    out, diffs = [], {}
    for key, pair in images.items():
        if {"layernorm", "none"} <= set(pair) and len(pair["layernorm"][0]) == len(pair["none"][0]):
            diffs[key] = pair["layernorm"][0] - pair["none"][0]
    for (condition, seed), d in diffs.items():
        base = diffs.get(("baseline", seed)) if condition != "baseline" else None
        contrast = d - base if base is not None and len(base) == len(d) else None
        out.append(dict(intervention=condition, seed=seed, diff=d.mean(), se=d.std(ddof=1) / np.sqrt(len(d)),
                        model_se=max(images[condition, seed][n][1] or 0.0 for n in ("layernorm", "none")),
                        against_baseline=None if contrast is None else contrast.mean(),
                        against_se=None if contrast is None else contrast.std(ddof=1) / np.sqrt(len(d))))
    return out


def paired_nll_lines(rows, conditions):
    """Markdown lines of paired_nll's rows, conditions in their grid order."""
    if not rows:
        return ["No seed pair has its per-image bounds measured yet."]

    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| condition | seed | layernorm - none, bits/dim | its SE, paired | each model's SE | "
             "minus baseline's | its SE, paired |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (conditions.index(r["intervention"]), r["seed"])):
        cells = [r["intervention"], r["seed"], cell(r["diff"], "+.4f"), cell(r["se"], ".4f"),
                 cell(r["model_se"], ".4f"), cell(r["against_baseline"], "+.4f"),
                 cell(r["against_se"], ".4f")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines
