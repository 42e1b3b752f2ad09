"""The report of the paper preset: tables, figures and the predictions' outcome of the paper-schedule study,
from whatever per-run files runs/ holds (n said everywhere); the direct statistic heads results.md where
measured, and the outcome rests on the sampled error it was written for."""


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ditnorm import figures, records, tables  # noqa: E402
from ditnorm.layout import measured_files  # noqa: E402
from ditnorm.measures import DIRECT_COLUMNS  # noqa: E402
from ditnorm.measures import PAPER_WEIGHTS as WEIGHTS  # noqa: E402
from ditnorm.records import write_atomic, write_rows  # noqa: E402
from ditnorm.studies import direct as direct_statistic  # noqa: E402

# Averages by how far back they reach at 50k steps (the std of their weighting, in steps): EMA d ~ 1/(1-d),
# a power EMA sigma_rel x 50k. The sphere EMA reaches as far as the DiT EMA.
REACH = {"raw": 0, "ema_0.999": 1000, "ema_0.9995": 2000, "power_0.05": 2500, "power_0.10": 5000,
         "ema": 10_000, "sphere_0.9999": 10_000}
LABEL = {"raw": "raw", "ema": "EMA 0.9999 (DiT)", "ema_0.999": "EMA 0.999", "ema_0.9995": "EMA 0.9995",
         "power_0.05": "power EMA 0.05", "power_0.10": "power EMA 0.10", "sphere_0.9999": "sphere EMA 0.9999"}
COLOURS = {"layernorm": "tab:red", "none": "tab:blue"}


# The columns the paper preset's measure phase writes into runs/<run>/<name>.csv; the report reads them.
COLUMNS = {"errors": ("norm", "seed", "step", "weights", "median", "p99", "max", "mean"),
           "weights": ("norm", "seed", "step", "weights", "tensor", "l2", "cosine_to_raw"),
           "rms": ("norm", "seed", "step", "weights", "timestep", "block", "rms"),
           "perturb": ("norm", "seed", "step", "direction", "alpha", "median", "p99", "max"),
           "direct": DIRECT_COLUMNS}
INTS = ("seed", "step", "block", "timestep")
# The weights kinds of the direct statistic's tables (direct.csv holds all of them).
DIRECT_WEIGHTS = ("raw", "ema", "ema_0.999", "sphere_0.9999")


def unreadable(path, reason):
    """The one line a measured file that cannot be read ends the report with."""
    return SystemExit(f"experiment.py: error: cannot read {path} ({reason}); delete it and run "
                      "experiment.py measure --preset paper again to rewrite it")


def gather(res_dir, name):
    """Every run's rows of runs/<run>/<name>.csv, numbers converted; SystemExit naming a bad file."""
    try:
        known = {"norm": COLOURS, "weights": WEIGHTS}
        return records.gather(res_dir, name, columns=COLUMNS[name], ints=INTS, known=known)
    except records.RowsError as e:
        raise unreadable(e.path, e.reason) from None


def read_pixels(res_dir):
    """{norm: [{weights: (N, P) |x| of one seed}]} of runs/<run>/pixels.npz; SystemExit naming a bad file."""
    pixels = {}
    for path in measured_files(res_dir, "pixels.npz"):
        norm = path.parent.name.rsplit("-seed", 1)[0]
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:  # foreign data: any failure of its parse is the file's
            raise unreadable(path, records.first_line(e)) from None
        pixels.setdefault(norm, []).append(arrays)
    return pixels


def by_seed(rows, norm, weights, step, key):
    """{seed: value} of one cell."""
    return {int(r["seed"]): r[key] for r in rows
            if r["norm"] == norm and r["weights"] == weights and r["step"] == step}


def bootstrap_ratio(res_dir, weights, stat, draws=2000, seed=0):
    """(ratio, low, high, seeds of layernorm, of none): layernorm / none of the seed median of `stat` at the
    last step, with the 2.5 and 97.5 percentiles of a bootstrap over seeds and samples (no 95% interval at a
    handful of seeds); None without data."""
    pixels = {norm: [seed[weights] for seed in seeds if weights in seed]  # (N, P) per seed
              for norm, seeds in read_pixels(res_dir).items()}
    if not pixels.get("layernorm") or not pixels.get("none"):
        return None
    fn = np.median if stat == "median" else np.max
    rng = np.random.default_rng(seed)

    def value(runs, resample):
        if resample:
            runs = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
            runs = [r[rng.integers(0, len(r), len(r))] for r in runs]
        return np.median([fn(r) for r in runs])

    ratio = value(pixels["layernorm"], False) / value(pixels["none"], False)
    draws = [value(pixels["layernorm"], True) / value(pixels["none"], True) for _ in range(draws)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return ratio, low, high, len(pixels["layernorm"]), len(pixels["none"])


def error_table(rows, step):
    lines = ["| weights | layernorm | none |", "|---|---|---|"]
    for weights in sorted(WEIGHTS, key=REACH.get):
        cells = [tables.cell(by_seed(rows, n, weights, step, "median").values(), lone=True) for n in COLOURS]
        lines.append(f"| {LABEL[weights]} | {cells[0]} | {cells[1]} |")
    return lines


def plot_error_vs_step(rows, path):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, weights in zip(axes, ("raw", "ema", "sphere_0.9999"), strict=True):
        cells = {}  # {norm: {step: [a median per seed]}}
        for r in sorted(rows, key=lambda r: r["step"]):
            if r["weights"] == weights:
                cells.setdefault(r["norm"], {}).setdefault(r["step"], []).append(r["median"])
        figures.band_plot(ax, {f"{n} (seeds: {_count([len(v) for v in c.values()])})": c
                               for n, c in cells.items()}, [COLOURS[n] for n in cells])
        ax.set(title=LABEL[weights], xlabel="training step")
    axes[0].set_ylabel("median |x| (seed median; band: seed min-max)")
    axes[0].legend()
    figures.save(fig, path)


def plot_averages(rows, step, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    order = sorted(WEIGHTS, key=lambda w: (REACH[w], w.startswith("sphere")))
    for norm, colour in COLOURS.items():
        cells = [list(by_seed(rows, norm, w, step, "median").values()) for w in order]
        if not any(cells):
            continue
        x = np.arange(len(order))
        ax.plot(x, [np.median(c) if c else np.nan for c in cells], color=colour, marker="o",
                label=f"{norm} (seeds: {max(len(c) for c in cells)})")
        for xi, c in zip(x, cells, strict=True):
            if len(c) > 1:
                ax.vlines(xi, min(c), max(c), color=colour, alpha=0.4)
    ax.set_xticks(np.arange(len(order)), [LABEL[w] for w in order], rotation=30, ha="right")
    ax.set(yscale="log", ylabel="median |x| (seed median, min-max)",
           title=f"Weights averaged how, at step {step:,}")
    ax.grid(alpha=0.3)
    ax.legend()
    figures.save(fig, path)


def writer_norms(weight_rows, norm, weights, key="l2"):
    """{step: {seed: key}} of all residual-stream writers together, of one norm and weights kind; key: their
    norm "l2" or their "cosine_to_raw"."""
    out = {}
    for r in weight_rows:
        if r["norm"] == norm and r["weights"] == weights and r["tensor"] == "writers":
            out.setdefault(r["step"], {})[r["seed"]] = r[key]
    return out


def plot_writer_norms(weight_rows, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    for norm, colour in COLOURS.items():
        for weights, style in (("raw", "-"), ("ema", "--"), ("sphere_0.9999", ":")):
            cells = writer_norms(weight_rows, norm, weights)
            steps = sorted(cells)
            if not steps:
                continue
            values = [list(cells[s].values()) for s in steps]
            n = max(len(v) for v in values)
            ax.plot(steps, [np.median(v) for v in values], style, color=colour,
                    label=f"{norm}, {LABEL[weights]} (seeds: {_count([len(v) for v in values])})")
            if n > 1 and weights == "raw":
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colour,
                                alpha=0.2)
    ax.set(xlabel="training step", ylabel="norm of all residual-stream writers")
    ax.set_title("seed median; band: min-max over seeds (raw)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figures.save(fig, path)


def writer_table(weight_rows, step):
    """Per averaged weights kind at `step`: its writer norm against raw's and its cosine to raw's."""
    lines = ["| weights | layernorm: norm / raw - 1 | layernorm: cosine to raw | none: norm / raw - 1 | "
             "none: cosine to raw |", "|---|---|---|---|---|"]
    for weights in sorted(WEIGHTS, key=REACH.get):
        if weights == "raw":
            continue
        cells = []
        for norm in COLOURS:
            lag, n = _writer_ratio(weight_rows, norm, weights, step, "raw", step)
            cos = list(writer_norms(weight_rows, norm, weights, "cosine_to_raw").get(step, {}).values())
            cells += ["-" if not n else f"{lag:+.2%} (n={n})",
                      f"{np.median(cos):.4f} (n={len(cos)})" if cos else "-"]
        lines.append(f"| {LABEL[weights]} | " + " | ".join(cells) + " |")
    return lines


def rms_table(rms_rows, step):
    """The residual stream's RMS after each block (raw weights, seed median) at `step`, per timestep."""
    rows = sorted((r for r in rms_rows if r["weights"] == "raw" and r["step"] == step),
                  key=lambda r: (list(COLOURS).index(r["norm"]), r["timestep"]))
    blocks = sorted({r["block"] for r in rows})
    declared = tables.Table(lines=("norm", "timestep"), value="rms", across="block", order=tuple(blocks),
                            names={b: f"block {b}" for b in blocks}, heads={"timestep": "t"}, test=None,
                            fmt=".3g", count=False, spread=False)
    return tables.render(declared, rows) if rows else []


def perturb_table(perturbed, errors, step):
    """Median |x| of raw + alpha d at `step`, per direction d and alpha, beside the raw weights'."""
    seeds = {n: {r["seed"] for r in perturbed if (r["norm"], r["step"]) == (n, step)} for n in COLOURS}
    rows = [dict(d="(raw weights)", alpha="0", norm=n, seed=s, value=v) for n in COLOURS
            for s, v in by_seed(errors, n, "raw", step, "median").items() if s in seeds[n]]
    rows += [dict(r, d=d, alpha=f"{a:g}", value=r["median"])
             for d in sorted({r["direction"] for r in perturbed}, reverse=True)
             for a in sorted({r["alpha"] for r in perturbed}) for n in COLOURS for r in perturbed
             if (r["norm"], r["step"], r["direction"], r["alpha"]) == (n, step, d, a)]
    return tables.render(tables.Table(lines=("d", "alpha"), order=tuple(COLOURS), test=None, lone=True), rows)


def perturb_steps_table(perturbed, errors):
    toward = sorted(d for d in {r["direction"] for r in perturbed} if d != "random")[0]
    columns = [("raw", None, None), (f"{toward} x0.25", toward, 0.25), ("random x1", "random", 1.0)]
    lines = ["| step | " + " | ".join(f"{n}: {c}" for n in COLOURS for c, _, _ in columns) + " |",
             "|---|" + "---|" * (len(COLOURS) * len(columns))]
    for step in sorted({r["step"] for r in perturbed}):
        cells = []
        for norm in COLOURS:
            mine = [r for r in perturbed if (r["norm"], r["step"]) == (norm, step)]
            seeds = {r["seed"] for r in mine}  # the raw weights' column: of the seeds perturbed here
            for _, direction, alpha in columns:
                values = ([v for s, v in by_seed(errors, norm, "raw", step, "median").items() if s in seeds]
                          if direction is None else
                          [r["median"] for r in mine if (r["direction"], r["alpha"]) == (direction, alpha)])
                cells.append(f"{np.median(values):.2e} ({len(values)})" if values else "-")
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return lines


def _count(ns):
    """'2', or '1-2' when steps rest on different numbers of seeds."""
    return f"{min(ns)}" if min(ns) == max(ns) else f"{min(ns)}-{max(ns)}"


def _values(values):
    return "[" + ", ".join(f"{v:.2e}" for v in sorted(values)) + "]"


def report(preset, res, options):
    # Every measured file is read before anything is written: a bad one leaves the report as it was.
    seeds = {cfg["seed"] for _, cfg in options["runs"]}  # the seeds asked for (all of the grid's by default)
    errors, weights, rms, perturbed, direct = ([r for r in gather(res, name) if r["seed"] in seeds]
                                               for name in ("errors", "weights", "rms", "perturb", "direct"))
    read_pixels(res)
    if not errors:
        raise SystemExit(f"error: no measurements under {res / 'runs'}; run experiment.py measure first")
    for rows, name in ((errors, "errors"), (weights, "weights"), (rms, "rms"), (direct, "direct")):
        write_rows(res / f"{name}.csv", rows)
    last = max(r["step"] for r in errors)
    plot_error_vs_step(errors, res / "error_vs_step.png")
    plot_averages(errors, last, res / "averages_at_last_step.png")
    plot_writer_norms(weights, res / "writer_norms.png")
    lines = [f"# Paper-schedule study: {len({(r['norm'], r['seed']) for r in errors})} runs measured",
             "", f"Made by `python experiment.py report --preset {options['preset']}` from "
             f"{res.parent.name}/{res.name}/runs/ on {options['now'].date()}.",
             *(["", *direct_statistic.section(direct, list(COLOURS), DIRECT_WEIGHTS), "## The sampled error",
                "", "The predictions' outcome below rests on these tables, for which they were written."]
               if direct else []),
             f"Median |x| at step {last:,}: seed median [min, max] (n seeds).", "",
             *error_table(errors, last), ""]
    lines += ["Ratio layernorm / none at the last step, in brackets the 2.5 and 97.5 percentiles of a "
              "bootstrap over seeds and samples: not a 95% interval, as no interval over 3 seeds is "
              "(statistics.md has the exact rank tests):", "",
              "| weights | median | max |", "|---|---|---|"]
    for w in ("raw", "ema", "sphere_0.9999"):
        cells = []
        for stat in ("median", "max"):
            b = bootstrap_ratio(res, w, stat)
            cells.append("-" if b is None else f"{b[0]:.2f} [{b[1]:.2f}, {b[2]:.2f}] (seeds {b[3]}/{b[4]})")
        lines.append(f"| {LABEL[w]} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Averaged weights against the raw ones at step {last:,} (all residual-stream writers "
              "together; seed median):", "", *writer_table(weights, last)]
    lines += ["", f"RMS of the residual stream after each block at step {last:,} (raw weights, x_0 = 0 "
              "noised to timestep t; seed median):", "", *rms_table(rms, last)]
    if perturbed:
        write_rows(res / "perturb.csv", perturbed)
        lines += ["", "Exploratory, after the outcome (the preset's perturb_steps): median |x| at step "
                  f"{last:,} of the raw weights plus alpha times a step d: d = EMA 0.999 - raw, or a random "
                  "direction with the same norm per tensor (seed median [min, max]):", "",
                  *perturb_table(perturbed, errors, last)]
        if len({r["step"] for r in perturbed}) > 1:
            lines += ["", "The same at every perturbed checkpoint (median |x|; seed median, n seeds):", "",
                      *perturb_steps_table(perturbed, errors)]
    verdicts = outcome(errors, weights, last)
    lines += ["", "The predictions (prediction.md) against these numbers:", "", *verdicts]
    write_atomic(res / "results.md", "\n".join(lines) + "\n")
    if (res / "prediction.md").is_file():
        tables.write_outcome(res / "prediction.md", verdicts)
    print("\n".join(lines))


def _median(rows, norm, weights, step, key="median"):
    values = list(by_seed(rows, norm, weights, step, key).values())
    return (float(np.median(values)), len(values)) if values else (np.nan, 0)


def _writer_ratio(weight_rows, norm, weights, step, base_weights, base_step):
    """Seed median of (writer norm of weights at step) / (writer norm of base_weights at base_step) - 1,
    over the seeds that have both, and how many those are; NaN when none has."""
    mine = writer_norms(weight_rows, norm, weights).get(step, {})
    base = writer_norms(weight_rows, norm, base_weights).get(base_step, {})
    values = [mine[s] / base[s] - 1 for s in mine if s in base]
    return (float(np.median(values)) if values else np.nan), len(values)


def outcome(errors, weight_rows, last):
    """One line per prediction of prediction.md: holds / fails / not testable, with its numbers."""
    med = {(n, w): _median(errors, n, w, last) for n in COLOURS for w in WEIGHTS}
    mx = {n: _median(errors, n, "raw", last, "max")[0] for n in COLOURS}
    seeds = {n: by_seed(errors, n, "ema", last, "median") for n in COLOURS}
    lines = []

    def say(name, holds, numbers, *inputs):
        """holds: True/False, or None when it cannot be decided; any NaN input makes it not testable."""
        if any(not np.isfinite(v) for v in inputs):
            holds, numbers = None, numbers + " (a value is missing: that checkpoint or norm is not measured)"
        verdict = "not testable" if holds is None else ("holds" if holds else "fails")
        lines.append(f"- {name} {verdict}: {numbers}")

    if all(seeds.values()):
        ln, no = seeds["layernorm"].values(), seeds["none"].values()
        say("C1", min(ln) > 1e-3 and max(no) < 1e-3, f"EMA medians layernorm {_values(ln)}, none "
            f"{_values(no)}")
        ratio, tail = med["layernorm", "raw"][0] / med["none", "raw"][0], mx["layernorm"] / mx["none"]
        say("C2", 0.5 <= ratio <= 2 and tail > 2, f"raw median ratio {ratio:.2f}, raw max ratio {tail:.2f}")
    else:
        say("C1", None, "needs both norms at the last step")
        say("C2", None, "needs both norms at the last step")
    first = 10_000 if any(r["step"] == 10_000 for r in weight_rows) else min(r["step"] for r in weight_rows)
    ratios = {n: _writer_ratio(weight_rows, n, "raw", last, "raw", first) for n in COLOURS}
    change = {n: value for n, (value, _) in ratios.items()}
    n_change = {n: count for n, (_, count) in ratios.items()}
    say("M1", abs(change["layernorm"]) > 0.1 and abs(change["layernorm"]) > abs(change["none"]),
        f"writer norm change {first:,} -> {last:,} (raw, seed median): layernorm {change['layernorm']:+.1%} "
        f"(n={n_change['layernorm']}), none {change['none']:+.1%} (n={n_change['none']})", *change.values())
    lag = {n: _writer_ratio(weight_rows, n, "ema", last, "raw", last)[0] for n in COLOURS}
    say("M2", abs(lag["layernorm"]) > 0.05 and abs(lag["none"]) < 0.05,
        f"EMA / raw writer norm - 1 at {last:,}: layernorm {lag['layernorm']:+.1%}, none {lag['none']:+.1%}",
        *lag.values())
    averages = [w for w in WEIGHTS if w != "raw"]
    best = {n: min(averages, key=lambda w, n=n: med[n, w][0]) for n in COLOURS}
    gain = {n: med[n, "ema"][0] / med[n, best[n]][0] for n in COLOURS}
    say("M3", REACH[best["layernorm"]] < REACH["ema"] and gain["layernorm"] >= 3 and gain["none"] <= 2,
        f"best average layernorm {LABEL[best['layernorm']]} ({gain['layernorm']:.1f}x better than EMA "
        f"0.9999), none {LABEL[best['none']]} ({gain['none']:.1f}x)", *gain.values())
    ln = {w: med["layernorm", w][0] for w in ("ema", "sphere_0.9999", "raw")}
    closed = np.log(ln["ema"] / ln["sphere_0.9999"]) / np.log(ln["ema"] / ln["raw"])
    moved = med["none", "sphere_0.9999"][0] / med["none", "ema"][0]
    say("R1", bool(closed >= 0.5 and 0.5 <= moved <= 2),
        f"sphere EMA closes {closed:.0%} of layernorm's EMA gap (log scale); for none it moves the median "
        f"{moved:.2f}x against EMA 0.9999", closed, moved)
    n = {k: len(v) for k, v in seeds.items()}
    note = " (preliminary: fewer than 3 seeds per norm)" if min(n.values()) < 3 else ""
    return [f"At step {last:,}, seeds: layernorm {n['layernorm']}, none {n['none']}{note}.", "", *lines]
