"""The MNIST study's report: tables, exact rank tests and figures from whatever runs/<run>/measures.csv
exist, each number with the count of seeds it rests on."""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import mannwhitneyu  # noqa: E402

from ditnorm.mnist_study import STATS_FILE, read_rows  # noqa: E402

RUN_NAME = re.compile(r"(?P<model>.+)-(?P<norm>layernorm|none|rmsnorm|dyt)-seed(?P<seed>\d+)$")
NORMS = ("layernorm", "none", "rmsnorm", "dyt")
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
        blocks = sorted({int(q[5:q.index("_")]) for q in table if q.startswith("block") and "_" in q})
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
    """Exact one-sided Mann-Whitney test that layernorm's values are larger than none's: (p, pairs
    ordered that way, all pairs); None below 2 seeds a side."""
    a = [v for v in layernorm if v is not None]
    b = [v for v in none if v is not None]
    if len(a) < 2 or len(b) < 2:
        return None
    p = mannwhitneyu(a, b, alternative="greater", method="exact").pvalue
    return p, sum(x > y for x in a for y in b), len(a) * len(b)


def final_table(runs):
    """Markdown: every FINAL statistic per model and norm at each run's last step, with the rank test."""
    lines = []
    for model in sorted({r["model"] for r in runs}):
        group = [r for r in runs if r["model"] == model]
        norms = [n for n in NORMS if any(r["norm"] == n for r in group)]
        lines += [f"**{model}** (last checkpoint of each run; seed median [min, max], n seeds)", "",
                  "| statistic | " + " | ".join(norms) + " | layernorm > none: pairs, exact one-sided p |",
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
                stats = {k: [value(r, last_step(r), weights, f"block{b}_{k}") for r in group]
                         for k in ("ratio", "top1", "lead_share", "var_top1", "massive")}
                med = {k: np.median([v for v in vs if v is not None]) if any(v is not None for v in vs)
                       else float("nan") for k, vs in stats.items()}
                lines.append(f"| {model} | {norm} | {b} | {med['ratio']:.1f} | {med['top1']:.3g} "
                             f"| {med['lead_share']:.2f} | {med['var_top1']:.2f} "
                             f"| {'yes' if med['massive'] > 0 else 'no'} (n={len(group)}) |")
    return "\n".join(lines)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(stats_root, out_dir=None):
    """Write results.md and curves.png into out_dir (default stats_root); returns results.md's text."""
    out_dir = Path(out_dir or stats_root)
    runs = load_runs(stats_root)
    counts = ", ".join(f"{m} {n}: {sum(r['model'] == m and r['norm'] == n for r in runs)}"
                       for m in sorted({r["model"] for r in runs}) for n in NORMS
                       if any(r["model"] == m and r["norm"] == n for r in runs))
    text = "\n".join([
        "# MNIST study: results", "",
        f"Runs measured (seeds): {counts or 'none yet'}. Exact one-sided Mann-Whitney tests between "
        "layernorm and none over seeds: with 3 seeds against 3 the smallest possible p is 0.05.", "",
        final_table(runs), "## Residual stream per block (last checkpoint, raw weights, seed medians)", "",
        block_table(runs), ""])
    out_dir.mkdir(parents=True, exist_ok=True)
    if runs:
        curves_figure(runs, out_dir / "curves.png")
    (out_dir / "results.md").write_text(text)
    return text


def preset_report(preset, record, options):
    """The mnist preset's report phase (experiment.py): report() on record/runs/, into record."""
    return report(record, record)
