"""The reports of the sample-error presets (the 4-norm study, make reproduce) from whatever runs/<run>/
errors.csv, outliers.csv and direct.csv exist: the direct statistic first where measured, then the sampled
tables (a cell: the seed median [min, max] of each seed's statistic over its samples)."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ditnorm import figures, notebooks, records, tables  # noqa: E402
from ditnorm.data import DATA_KINDS  # noqa: E402
from ditnorm.diagram import plot_dit_block  # noqa: E402
from ditnorm.records import grouped, savefig_atomic, seed_spread, write_atomic, write_rows  # noqa: E402
from ditnorm.studies import direct as direct_statistic  # noqa: E402
from models import NORM_KINDS  # noqa: E402

ERROR_KEYS = ("mean", "median", "p99", "max")
MEASURE_LABELS = {"abs_x": "|x|", "dev_const": "|x - mean(x)|"}
TABLE_LABELS = {"abs_x": "abs x", "dev_const": "abs(x - mean x)"}  # no pipes inside markdown cells
INTS = ("seed", "step", "block", "timestep", "nonfinite", "noise_seed", "inputs")


def gather(out, name, grid=None):
    """Every run's rows of runs/<run>/<name>.csv, numbers converted, of the grid's data, norms and seeds in
    its order (data, norm, seed, step) when a grid is given."""
    measures = list(MEASURE_LABELS)
    known = grid and {"data": grid["data"], "norm": grid["norm"], "measure": measures}
    rows = records.gather(out, name, ints=INTS, known=known)
    if grid is None:
        return rows
    return sorted((r for r in rows if r["seed"] in grid["seed"]),
                  key=lambda r: (grid["data"].index(r["data"]), grid["norm"].index(r["norm"]), r["seed"],
                                 r["step"], measures.index(r.get("measure", "abs_x"))))


def error_table(rows, with_step):
    """Markdown table: one line per (data, measure, norm[, step]) with the seed spread of each statistic."""
    keys = ("data", "measure", "norm") + (("step",) if with_step else ())
    head = ("| data | error | norm |" + (" step |" if with_step else "") + " seeds | "
            + " | ".join(ERROR_KEYS) + " | non-finite | KS(c) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, group in grouped(rows, *keys).items():
        ks = [r["ks_c"] for r in group]
        cells = [key[0], TABLE_LABELS[key[1]], *map(str, key[2:]), str(len(group))]
        cells += [tables.cell([r[k] for r in group], count=False) for k in ERROR_KEYS]
        cells += [str(sum(r["nonfinite"] for r in group)),
                  tables.cell(ks, ".3f", count=False) if np.isfinite(ks).any() else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outlier_table(outliers):
    """Markdown lines of the per-block top-1 / median ratio, median [min, max] over seeds."""
    blocks = sorted({o["block"] for o in outliers})
    declared = tables.Table(lines=("data", "norm"), value="ratio", across="block", order=tuple(blocks),
                            names={b: f"block {b}" for b in blocks}, test=None, fmt=".3g", count=False)
    return tables.render(declared, outliers)


def plot_error_vs_step(rows, path, stats=("median", "p99", "max")):
    """Error statistics against training step; columns: (data, error measure, weights), lines: norms."""
    panels = list(grouped(rows, "data", "measure", "weights"))
    fig, axes = plt.subplots(len(stats), len(panels), figsize=(4.4 * len(panels), 3.2 * len(stats) - 0.1),
                             squeeze=False, sharex=True)
    for col, panel in enumerate(panels):
        panel_rows = [r for r in rows if (r["data"], r["measure"], r["weights"]) == panel]
        for row, stat in enumerate(stats):
            groups = {norm: {step: [r[stat] for r in g] for (step,), g in grouped(norm_rows, "step").items()}
                      for (norm,), norm_rows in grouped(panel_rows, "norm").items()}
            figures.band_plot(axes[row, col], groups)
            title = f"{panel[0]} data, {panel[2]} weights: {stat} of {MEASURE_LABELS[panel[1]]}"
            axes[row, col].set_title(title, fontsize=9)
        axes[-1, col].set_xlabel("training step")
    axes[0, 0].legend(fontsize=8)
    seeds = len({r["seed"] for r in rows})  # a band only where there is more than one seed
    fig.suptitle("Sample error against training step" + (" (one seed)" if seeds == 1 else f" (line: median "
                 f"over {seeds} seeds; band: min-max over seeds)"), fontsize=10)
    figures.save(fig, path)


def setup_line(preset, rows):
    cfg, m = preset["cfg"], preset["measure_args"]
    return (f"Setup: {cfg['model']}, global batch {cfg['global_batch_size']}, AdamW lr {cfg['lr']:g}, "
            f"EMA {cfg['ema_decay']}, {cfg['max_steps']} steps, checkpoints at {cfg['ckpt_steps']}, "
            f"{len({r['seed'] for r in rows})} seeds per variant. Each checkpoint's "
            f"{' and '.join(m['weights'])} weights draw {m['num_samples']} samples by ancestral sampling in "
            f"{m['sampling_steps']} steps, all from the same noise (seed {m['sample_seed']}).")


SAMPLED_NOTE = ("The tables below are of the sampled error, a statistic of each checkpoint's samples from "
                "one noise set; the prediction's outcome (prediction.md) rests on them, as it was written "
                "for them.")


PREDICTION = """\
Measure: the seed median of the median per-pixel deviation |x - mean(x)| at the last checkpoint.
  P1  constant data is harder for every variant: the measure is larger on constant than on zeros data.
  P2  LayerNorm's loss of scale matters more there: the ratio layernorm / none is larger on constant data
      than on zeros data.
  P3  on constant data the two scale-removing norms (layernorm, rmsnorm) are both worse than the two that
      keep the scale (none, dyt), with seed ranges that do not overlap.
  P4  the coarse distribution is learnt by all variants: the KS distance of the sample means to U[-1, 1]
      is below 0.1 for every variant (the loss of scale shows in the fine detail, not in c)."""


def prediction_outcome(rows):
    """Check P1-P4 on the last checkpoint: a list of (name, held: True/False/None if not testable, detail)."""
    last = max(r["step"] for r in rows)
    final = [r for r in rows if r["step"] == last and r["measure"] == "dev_const"]
    per_seed = {key: [r["median"] for r in group] for key, group in grouped(final, "data", "norm").items()}
    med = {key: seed_spread(values)[0] for key, values in per_seed.items()}
    norms = [n for (d, n) in per_seed if d == "constant" and ("zeros", n) in per_seed]
    detail = ", ".join(f"{n}: {med['zeros', n]:.2e} -> {med['constant', n]:.2e}" for n in norms)
    results = [("P1", all(med["constant", n] > med["zeros", n] for n in norms) if norms else None,
                f"median deviation zeros -> constant: {detail}")]
    if {"layernorm", "none"} <= set(norms):
        ratio = {d: med[d, "layernorm"] / med[d, "none"] for d in DATA_KINDS}
        results.append(("P2", ratio["constant"] > ratio["zeros"],
                        f"layernorm / none: zeros {ratio['zeros']:.3g}, constant {ratio['constant']:.3g}"))
    else:
        results.append(("P2", None, "needs layernorm and none"))
    if set(NORM_KINDS) <= set(norms):
        worst_kept = max(max(per_seed["constant", n]) for n in ("none", "dyt"))
        best_removed = min(min(per_seed["constant", n]) for n in ("layernorm", "rmsnorm"))
        results.append(("P3", best_removed > worst_kept, f"best seed of layernorm/rmsnorm "
                        f"{best_removed:.2e}, worst seed of none/dyt {worst_kept:.2e}"))
    else:
        results.append(("P3", None, "needs all four norms"))
    ks = {n: seed_spread([r["ks_c"] for r in final if r["data"] == "constant" and r["norm"] == n])[0]
          for n in norms}
    results.append(("P4", all(v < 0.1 for v in ks.values()) if ks else None,
                    "KS(c) seed medians: " + ", ".join(f"{n} {v:.3f}" for n, v in ks.items())))
    return results


def write_outcome(path, rows):
    """The outcome below the prediction (written first if there is no prediction file yet)."""
    verdict = {True: "held", False: "did not hold", None: "not testable with these variants"}
    tables.write_outcome(path, ["At the last checkpoint, from study_errors.csv:", "",
                                *(f"- {name} {verdict[held]}: {detail}"
                                  for name, held, detail in prediction_outcome(rows))],
                         f"# Prediction for the constant-data experiment\n\nWritten before the runs "
                         f"started.\n\n```\n{PREDICTION}\n```\n\n")


def measured(preset, out, *others):
    """The errors, direct and `others` rows of a record, read before errors.csv and direct.csv are written
    beside the report; SystemExit without errors."""
    rows, direct, *more = (gather(out, name, preset["grid"]) for name in ("errors", "direct", *others))
    if not rows:
        raise SystemExit(f"error: no measurements under {out / 'runs'}; run experiment.py measure first")
    write_rows(out / "errors.csv", rows)
    write_rows(out / "direct.csv", direct)
    return rows, direct, *more


def study_report(preset, out, options):
    rows, direct, outliers = measured(preset, out, "outliers")
    last = max(r["step"] for r in rows)
    parts = [
        "# The 4-norm study: sample error by normalisation, seed and data", "",
        f"Made by `python experiment.py report --preset {options['preset']}` from {out.name}/runs/.", "",
        setup_line(preset, rows), "",
        *direct_statistic.section(direct, preset["grid"]["norm"]), *([SAMPLED_NOTE, ""] if direct else []),
        "Error |x| on zeros data; |x - mean(x)| (distance of each pixel from its sample's mean, the "
        "nearest constant image) on both data sets. KS(c): Kolmogorov-Smirnov distance of the sample means "
        "to U[-1, 1] (constant data only). A cell: the median over seeds [min, max]. Per-seed rows: "
        "errors.csv.", "",
        f"## Last checkpoint (step {last})", "", error_table([r for r in rows if r["step"] == last], False),
        "",
        "## Every checkpoint", "", error_table(rows, with_step=True), ""]
    if outliers:
        parts += ["## Outlier ratio of the final models (top-1 / median abs value of the residual stream "
                  f"after each block, on 64 noised inputs of x0 = 0 at t = {outliers[0]['timestep']})", "",
                  *outlier_table(outliers), ""]
    write_atomic(out / "errors.md", "\n".join(parts))
    plot_error_vs_step(rows, out / "error_vs_step.png")
    if set(DATA_KINDS) <= {r["data"] for r in rows}:
        write_outcome(out / "prediction.md", rows)
    print("\n".join(parts))


LABELS = {"layernorm": "LayerNorm", "none": "no norm"}
STATS = ("median", "max")


def _cell(values):
    return tables.cell(values, ".1e", count=False)  # the headline's cell, as headline.md has always had it


def headline_of(preset, rows, machine):
    """The headline: per weights kind, each norm's median and max |x| at the last step, a value per seed;
    machine: experiment.hardware()'s lines."""
    cfg, m = preset["cfg"], preset["measure_args"]
    rows = [r for r in rows if r["measure"] == "abs_x"]
    step = max(r["step"] for r in rows)
    values = {w: {f"{n} {s}": [r[s] for r in rows if (r["weights"], r["norm"], r["step"]) == (w, n, step)]
                  for n in LABELS for s in STATS} for w in ("ema", "raw")}
    setup = dict(model=cfg["model"], global_batch_size=cfg["global_batch_size"], lr=cfg["lr"],
                 ema_decay=cfg["ema_decay"], max_steps=cfg["max_steps"],
                 num_checkpoints=len(cfg["ckpt_steps"].split(",")), num_samples=m["num_samples"],
                 sampling_steps=m["sampling_steps"], seeds=len({r["seed"] for r in rows}))
    return dict(setup=setup, step=step, values=values, machine=", ".join(machine[:2]))


def headline_markdown(headline):
    """The headline table: per weights and statistic, both norms' seed spread, their ratio, the overlap."""
    setup = headline["setup"]
    lines = [
        "# Headline: LayerNorm against no norm", "",
        f"{setup['model']}, batch {setup['global_batch_size']}, AdamW lr {setup['lr']:g}, EMA "
        f"{setup['ema_decay']}, {setup['max_steps']} steps, zero data; {setup['seeds']} seeds per norm. "
        f"Step {headline['step']}: {setup['num_samples']} samples per model in {setup['sampling_steps']} "
        "ancestral steps, the same noise for every model; |x| is the error. A cell: median over seeds "
        "[min, max].", "",
        "| weights | error | LayerNorm | no norm | LayerNorm / no norm | seeds |",
        "|---|---|---|---|---:|---|"]
    for weights in ("ema", "raw"):
        for stat in STATS:
            ln, none = (headline["values"][weights][f"{n} {stat}"] for n in LABELS)
            ratio = seed_spread(ln)[0] / seed_spread(none)[0]
            relation = ("every LayerNorm seed higher" if min(ln) > max(none) else
                        "every LayerNorm seed lower" if max(ln) < min(none) else "seed ranges overlap")
            lines.append(f"| {weights.upper() if weights == 'ema' else weights} | {stat} abs x | {_cell(ln)} "
                         f"| {_cell(none)} | {ratio:.2g}x | {relation} |")
    return "\n".join([*lines, "", f"Machine: {headline['machine']}."]) + "\n"


def compare(new, reference):
    """Lines setting the new headline beside the committed one: where each new seed median falls."""
    if reference is None:
        return ["No committed headline to compare with (headline.json is missing)."]
    if reference["setup"] != new["setup"]:
        differ = sorted(k for k in new["setup"] if new["setup"][k] != reference["setup"].get(k))
        return [f"The committed headline is of another configuration ({', '.join(differ)} differ); not "
                "compared."]
    lines = [f"Against the committed headline ({reference['machine']}):", "",
             "| weights | error | norm | this run | committed | this run's median |",
             "|---|---|---|---|---|---|"]
    outside = []
    for weights in ("ema", "raw"):
        for key, values in new["values"][weights].items():
            med, (_, low, high) = seed_spread(values)[0], seed_spread(reference["values"][weights][key])
            where = "inside" if low <= med <= high else ("below" if med < low else "above")
            if where != "inside":
                outside.append(f"{weights} {key}")
            norm, stat = key.split()
            lines.append(f"| {weights} | {stat} abs x | {LABELS[norm]} | {_cell(values)} | "
                         f"{_cell(reference['values'][weights][key])} | {where} the committed seed range |")
    total = sum(len(v) for v in new["values"].values())
    return lines + ["", f"{total - len(outside)} of {total} new seed medians fall inside the committed seed "
                    "ranges" + (f"; outside: {', '.join(outside)}." if outside else ".")]


def plot_headline(rows, path, title):
    """Median and max |x| against step, EMA and raw weights: seed median (line) and min-max (band)."""
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.9), sharex=True)
    rows = [r for r in rows if r["measure"] == "abs_x"]
    for ax, stat in zip(axes, STATS, strict=True):
        figures.band_plot(ax, {f"{LABELS[n]}, {w.upper() if w == 'ema' else w}": {
            s: [r[stat] for r in g]
            for (s,), g in grouped([r for r in rows if (r["norm"], r["weights"]) == (n, w)], "step").items()}
            for w in ("ema", "raw") for n in LABELS})
        ax.set_title(f"{stat} |x| over the samples (target: 0)", fontsize=9)
        ax.set_xlabel("training step")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9.5)
    figures.save(fig, path, dpi=130)


def reproduce_report(preset, out, options):
    """headline.md/.json/.png against the committed headline, errors.md, the block diagram, and both
    notebooks on seed 0 when its run folders are there; results.md collects them."""
    rows, direct = measured(preset, out)
    direct_part = direct_statistic.section(direct, preset["grid"]["norm"])
    ema, raw = ([r for r in rows if r["weights"] == w] for w in ("ema", "raw"))
    last = max(r["step"] for r in rows)
    errors = ["# Sample errors of every checkpoint", "", setup_line(preset, rows), ""]
    for name, part in (("EMA", ema), ("raw", raw)):
        errors += [f"## {name} weights, last checkpoint (step {last})", "",
                   error_table([r for r in part if r["step"] == last], with_step=False), "",
                   f"## {name} weights, every checkpoint", "", error_table(part, with_step=True), ""]
    write_atomic(out / "errors.md", "\n".join(errors))
    headline = headline_of(preset, rows, options["hardware"])
    reference = options["reference"]
    comparison = compare(headline, json.loads(reference.read_text()) if reference.is_file() else None)
    setup = headline["setup"]
    seeds = setup["seeds"]
    plot_headline(rows, out / "headline.png", f"{setup['model']}, zero data, batch "
                  f"{setup['global_batch_size']}, {setup['num_samples']} samples per point\n"
                  + (f"line: median over {seeds} seeds; band: min-max over seeds" if seeds > 1
                     else "one seed (no band)"))
    write_atomic(out / "headline.json", json.dumps(headline, indent=1) + "\n")
    write_atomic(out / "headline.md", headline_markdown(headline))
    savefig_atomic(plot_dit_block(), out / "dit_block.png", dpi=130)
    runs = {n: options["runs_dir"] / name for name, cfg in options["runs"] for n in LABELS
            if cfg["norm"] == n and cfg["seed"] == min(r["seed"] for r in rows)}
    skipped = notebooks.run_both(runs, out, options["runs_dir"].parent / "notebooks",
                                 pretrained=preset.get("pretrained", "DiT-XL-2-256x256.pt"))
    text = [
        "# Reproduction results", "",
        f"Made by `python experiment.py report --preset {options['preset']}` on "
        f"{options['now'].isoformat(timespec='seconds')}.", "",
        "## Hardware", "", *[f"- {h}" for h in options["hardware"]], "",
        *direct_part,
        *(["The headline and comparison below are of the sampled error (samples from one noise set), as "
           "the committed headline is.", ""] if direct_part else []),
        "## " + headline_markdown(headline).removeprefix("# "), "## Comparison", "", *comparison, ""]
    for name, title in (("toydit_errors.md", "Seed 0: toy samples (|x| is the error)"),
                        ("token_outliers.md",
                         "Seed 0: residual-stream outliers (massive: > 100 and >= 1000x the median)")):
        if (out / name).is_file():
            text += [f"## {title}", "", (out / name).read_text().strip(), ""]
    text += ["## Figures", "", *[f"- {p.relative_to(out)}" for p in sorted(out.glob("*.png"))]]
    text += ["", "## Skipped", "", *[f"- {s}" for s in skipped]] if skipped else []
    write_atomic(out / "results.md", "\n".join(text) + "\n")
    print("\n".join([*direct_part, headline_markdown(headline).split("\n", 2)[2], *comparison]))
