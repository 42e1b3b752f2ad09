"""The tables of the direct statistic (measures.direct_rows, runs/<run>/direct.csv) for every toy report.

A seed's value is a fixed quantile (p50, p99, p99.9) of the denoiser's x_0 error over all pixels of its
10^5 fresh inputs at one timestep. A cell is the median over seeds [min, max] (n seeds). The main table takes
each seed's median over the last few checkpoints it was measured at (at a constant learning rate single
checkpoints swing by large factors: docs/results-notes.md); the second the last checkpoint alone. The test
is stats.rank_test: the exact one-sided Mann-Whitney test of "LayerNorm's error is larger than no norm's",
over seeds; with n1 against n2 seeds its smallest possible p is 1 / C(n1 + n2, n1) (0.05 at 3 against 3,
1/6 at 2 against 2).
"""


import numpy as np

from ditnorm import tables
from ditnorm.records import grouped
from ditnorm.stats import rank_test, smallest_p

QUANTILES = ("p50", "p99", "p99.9")
LAST = 3  # checkpoints per seed in the main table


def spread(values):
    """'median [min, max] (n=k)' over seeds; '-' for none."""
    return tables.cell(values)


def last_steps(rows, last=LAST):
    """The last `last` steps at which any run was measured."""
    return sorted({r["step"] for r in rows})[-last:]


def seed_values(rows, steps, quantile):
    """{norm: [per seed: the median of `quantile` over its rows at `steps`]} of rows of one table line."""
    out = {}
    for (norm, _seed), group in grouped(rows, "norm", "seed").items():
        values = [float(r[quantile]) for r in group if r["step"] in steps]
        if values:
            out.setdefault(norm, []).append(float(np.median(values)))
    return out


def rank_cells(values):
    """The layernorm / none ratio of seed medians, the rank test's pairs, and its p with the smallest
    possible p; '-' cells without both norms."""
    ln, none = values.get("layernorm", []), values.get("none", [])
    if not ln or not none:
        return ["-", "-", "-"]
    test = rank_test(ln, none)
    smallest = smallest_p(test.n1, test.n2)
    return [f"{np.median(ln) / np.median(none):.2f}", f"{test.u:g} of {test.n1 * test.n2}",
            f"{test.p:.3f} ({smallest:.3f})"]


def table(rows, norms, steps):
    """Markdown lines: one line per (data, weights, timestep, quantile); per norm the seed spread of each
    seed's median over `steps`, then the test of layernorm against none."""
    head = ("| data | weights | t | quantile | " + " | ".join(norms)
            + " | layernorm / none | pairs layernorm > none | p, exact one-sided (smallest possible) |")
    lines = [head, "|---|---|---:|---|" + "---|" * len(norms) + "---:|---:|---:|"]
    for (data, weights, t), group in grouped(rows, "data", "weights", "timestep").items():
        for quantile in QUANTILES:
            values = seed_values(group, set(steps), quantile)
            cells = [spread(values.get(n, [])) for n in norms] + rank_cells(values)
            lines.append(f"| {data} | {weights} | {t} | {quantile} | " + " | ".join(cells) + " |")
    return lines


def step_table(rows, norms, timestep=0):
    """Markdown lines: the seed spread of each quantile at every checkpoint, at one timestep."""
    lines = ["| data | weights | norm | step | " + " | ".join(QUANTILES) + " |",
             "|---|---|---|---:|" + "---|" * len(QUANTILES)]
    rows = [r for r in rows if r["timestep"] == timestep]
    groups = grouped(rows, "data", "weights", "norm", "step")
    # grouped keeps the order first seen, in which a step measured for a later seed only (an early
    # checkpoint) comes after the steps of the seeds before it: steps ascend within each line instead.
    line = {key[:3]: i for i, key in enumerate(dict.fromkeys(k[:3] for k in groups))}
    for (data, weights, norm, step), group in sorted(groups.items(),
                                                     key=lambda kv: (line[kv[0][:3]], int(kv[0][3]))):
        if norm in norms:
            cells = [spread(r[q] for r in group) for q in QUANTILES]
            lines.append(f"| {data} | {weights} | {norm} | {step} | " + " | ".join(cells) + " |")
    return lines


def order(rows, norms, weights=None):
    """The rows sorted by data, weights (in the order given, else as first seen), timestep, norm, seed and
    step, and only those of `weights` when given."""
    if weights is not None:
        rows = [r for r in rows if r["weights"] in weights]
    data = list(dict.fromkeys(r["data"] for r in rows))
    kinds = list(weights or dict.fromkeys(r["weights"] for r in rows))
    return sorted(rows, key=lambda r: (data.index(r["data"]), kinds.index(r["weights"]), r["timestep"],
                                       norms.index(r["norm"]) if r["norm"] in norms else len(norms),
                                       r["seed"], r["step"]))


def section(rows, norms, weights=None, level="##"):
    """The direct statistic's markdown: the main table (median over the last checkpoints), the last
    checkpoint alone, and every checkpoint at t = 0; [] when there are no rows."""
    rows = order(rows, norms, weights)
    if not rows:
        return []
    steps, last = last_steps(rows), max(r["step"] for r in rows)
    inputs = sorted({int(r["inputs"]) for r in rows})
    times = sorted({r["timestep"] for r in rows})
    ckpts_per_seed = [len({r["step"] for r in g} & set(steps))
                      for g in grouped(rows, "norm", "seed", "weights").values()]
    low, high = min(ckpts_per_seed), max(ckpts_per_seed)
    counts = f"{low}" if low == high else f"{low} to {high}"
    kinds = "" if weights is None else f" Weights kinds shown: {', '.join(weights)} (all in direct.csv)."
    return [
        f"{level} The direct statistic: the denoiser's x_0 error on fresh inputs (main table)",
        "",
        f"Per seed and checkpoint: the p50, p99 and p99.9 over all pixels of the denoiser's x_0 error on "
        f"{' / '.join(map(str, inputs))} inputs x_0 noised to each timestep t in {times} of the training "
        "diffusion (|x0_pred| on zeros data, |x0_pred - its image's mean| on constant data), a noise set of "
        "its own per seed (noise seed in direct.csv). A sampled chain's final value is this prediction at "
        "t = 0 on the chain's own last input: the sampled tables below measure the same denoiser on fewer "
        f"inputs.{kinds}",
        "",
        f"Cell: seed median [min, max] (n seeds) of each seed's median over its checkpoints at steps "
        f"{', '.join(map(str, steps))} ({counts} of them measured per seed and weights kind). "
        "layernorm / none: ratio of the seed medians. Pairs: (layernorm seed, none seed) pairs with "
        "layernorm's error larger, a tie counting 1/2. p: exact one-sided Mann-Whitney test "
        "(stats.rank_test) of layernorm > none over seeds, not corrected for the many lines; in brackets "
        "the smallest p its seed counts allow.",
        "",
        *table(rows, norms, steps),
        "",
        f"{level} The direct statistic at the last checkpoint alone (step {last})",
        "",
        "The same, each seed's value at one checkpoint.",
        "",
        *table([r for r in rows if r["step"] == last], norms, [last]),
        "",
        f"{level} The direct statistic at every checkpoint measured, t = 0",
        "",
        "Cell: seed median [min, max] (n seeds).",
        "",
        *step_table(rows, norms),
        "",
    ]
