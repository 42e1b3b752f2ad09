"""The tables of the direct statistic (measures.direct_rows: fixed quantiles of the denoiser's x_0 error on
10^5 fresh inputs) for every toy report: the main table takes each seed's median over its last checkpoints
(single checkpoints swing), then the last checkpoint alone, then every checkpoint at t = 0."""


from ditnorm import tables
from ditnorm.records import grouped

QUANTILES = ("p50", "p99", "p99.9")
LAST = 3  # checkpoints per seed in the main table


def last_steps(rows, last=LAST):
    """The last `last` steps at which any run was measured."""
    return sorted({r["step"] for r in rows})[-last:]


def table(rows, norms, steps):
    """Markdown lines: one line per (data, weights, timestep, quantile); per norm the seed spread of each
    seed's median over `steps`, then the test of layernorm against none."""
    declared = tables.Table(lines=("data", "weights", "timestep", "statistic"), order=tuple(norms),
                            heads={"timestep": "t", "statistic": "quantile"}, right=("timestep",))
    return tables.render(declared, tables.long([r for r in rows if r["step"] in set(steps)], QUANTILES))


def step_table(rows, norms, timestep=0):
    """Markdown lines: the seed spread of each quantile at every checkpoint, at one timestep."""
    rows = [r for r in rows if r["timestep"] == timestep and r["norm"] in norms]
    # a step measured for a later seed only (an early checkpoint) is first seen after the steps of the seeds
    # before it: steps ascend within each line instead
    line = {key: i for i, key in enumerate(grouped(rows, "data", "weights", "norm"))}
    rows = sorted(rows, key=lambda r: (line[r["data"], r["weights"], r["norm"]], r["step"]))
    declared = tables.Table(lines=("data", "weights", "norm", "step"), across="statistic", order=QUANTILES,
                            test=None, right=("step",))
    return tables.render(declared, tables.long(rows, QUANTILES))


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
