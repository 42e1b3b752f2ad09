"""Statistics that stay valid at a handful of seeds: the exact one-sided Mann-Whitney test (every split of
the pooled values enumerated: 3 against 3 gives at best p = 0.05) and its stratified form, fixed quantiles
(which, unlike a maximum, do not grow with the sample count), and res/paper/statistics.md recomputed."""

import itertools
import math
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ditnorm.layout import measured_files
from ditnorm.records import read_rows

QUANTILES = (0.5, 0.99, 0.999)
# Splits enumerated at most; C(16, 8) = 12870, far beyond any seed count of this repository.
MAX_SPLITS = 1_000_000


class RankTest(NamedTuple):
    """One-sided exact Mann-Whitney test of "x tends to be larger than y"."""
    u: float  # pairs (x_i, y_j) with x_i > y_j, ties counting 1/2
    p: float  # exact P(U >= u) over all splits of the pooled values, each equally likely under no effect
    n1: int
    n2: int


def mann_whitney_u(x, y):
    """U of x against y: the number of pairs with x_i > y_j, a tie counting one half."""
    x, y = np.asarray(x, dtype=float)[:, None], np.asarray(y, dtype=float)[None, :]
    return float((x > y).sum() + 0.5 * (x == y).sum())


def _u_counts(x, y):
    """(2U of x against y, {2U: number of the C(n1 + n2, n1) splits of the pooled values that give it})."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError(f"a rank test needs values in both groups, got {n1} and {n2}")
    if math.comb(n1 + n2, n1) > MAX_SPLITS:
        raise ValueError(f"{math.comb(n1 + n2, n1)} splits of {n1} + {n2} values is too many to enumerate; "
                         "use a normal approximation for samples this large")
    pooled = np.array([*x, *y], dtype=float)
    counts = Counter()
    for chosen in itertools.combinations(range(n1 + n2), n1):
        mask = np.zeros(n1 + n2, dtype=bool)
        mask[list(chosen)] = True
        counts[round(2 * mann_whitney_u(pooled[mask], pooled[~mask]))] += 1  # 2U: ties make halves
    return round(2 * mann_whitney_u(x, y)), counts


def rank_test(x, y):
    """Exact one-sided Mann-Whitney test that x is stochastically larger than y; a RankTest. The null
    distribution is U's over all C(n1 + n2, n1) assignments of the pooled values to x (ties exact, no normal
    approximation); 3 against 3: smallest p 0.05."""
    return stratified_rank_test([(x, y)])


def stratified_rank_test(strata):
    """Exact one-sided test that x is larger than y within strata [(x, y), ...] (sizes, conditions): the
    statistic is the sum of the strata's U, its null distribution that of independent relabellings within
    every stratum, each equally likely (the convolution of the strata's exact U distributions). A RankTest
    whose u is the summed U and n1, n2 the summed counts; one stratum is rank_test."""
    observed, total = 0, Counter({0: 1})
    for x, y in strata:
        u2, counts = _u_counts(list(map(float, x)), list(map(float, y)))
        observed += u2
        merged = Counter()
        for (a, m), (b, k) in itertools.product(total.items(), counts.items()):
            merged[a + b] += m * k
        total = merged
    at_least = sum(k for value, k in total.items() if value >= observed)
    return RankTest(u=observed / 2, p=at_least / sum(total.values()), n1=sum(len(x) for x, _ in strata),
                    n2=sum(len(y) for _, y in strata))


def smallest_stratified_p(strata):
    """The smallest p stratified_rank_test can give on strata of these sizes [(n1, n2), ...]."""
    return float(np.prod([smallest_p(n1, n2) for n1, n2 in strata]))


def smallest_p(n1, n2):
    """The smallest p an exact rank test of n1 values against n2 can give: 1 / C(n1 + n2, n1) (3 against 3:
    0.05; 2 against 2: 0.17)."""
    return 1 / math.comb(n1 + n2, n1)


def fixed_quantiles(values, quantiles=QUANTILES):
    """{'p50': ..., 'p99': ..., 'p99.9': ...} of the finite values (linear interpolation; nan if none)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    return {f"p{round(100 * q, 6):g}": float(np.quantile(v, q) if v.size else np.nan) for q in quantiles}


NORMS = ("layernorm", "none")
STATISTICS = {"median": np.median, "p90": lambda a: np.quantile(a, 0.9),
              "p99": lambda a: np.quantile(a, 0.99), "max": np.max}


def _pixels(res_dir, weights):
    """{norm: {seed: (N, P) |x| of the last step}} from runs/<norm>-seed<k>/pixels.npz."""
    out = {}
    for path in measured_files(res_dir, "pixels.npz"):
        norm, seed = path.parent.name.rsplit("-seed", 1)
        with np.load(path) as f:
            if weights in f:
                out.setdefault(norm, {})[int(seed)] = np.asarray(f[weights], dtype=np.float64)
    return out


def _per_seed(pixels, fn):
    return {norm: [fn(pixels[norm][s]) for s in sorted(pixels[norm])] for norm in NORMS}


def _ratio(values):
    """layernorm / none of the seed medians."""
    return float(np.median(values["layernorm"]) / np.median(values["none"]))


def _pct_range(values, digits=1):
    """'+a% to +b% (median +c%)' of fractions."""
    if not values:
        return "-"
    lo, hi, mid = (100 * f(values) for f in (min, max, np.median))
    return f"{lo:+.{digits}f}% to {hi:+.{digits}f}% (median {mid:+.{digits}f}%)"


def _rows(res_dir, name):
    """The rows of res_dir/<name>.csv, numbers converted."""
    return read_rows(Path(res_dir) / f"{name}.csv", ints=("seed", "step"))


def paper_statistics(res_dir="res/paper", first=10_000, last=50_000):
    """Markdown: the exact rank tests, quantile ratios, max-by-sample-count, worst samples, gate norms and
    perturbation ratios of the paper study, from the committed files under res_dir."""
    res_dir = Path(res_dir)
    lines = ["# Paper-schedule study: exact rank tests and the numbers behind the README's answer", "",
             "Recomputed from the committed files of this folder (`runs/*/pixels.npz`, `weights.csv`, "
             "`errors.csv`, `perturb.csv`) by `ditnorm.stats.write_statistics`; "
             "`tests/test_stats.py` checks that this file is what it writes.", "",
             "## LayerNorm against no norm at the last step (50k), one seed per value", "",
             "Per seed: the statistic of |x| over its 1000 samples x 8 pixels. Ratio: LayerNorm / none of "
             "the seed medians. p: exact one-sided Mann-Whitney test of LayerNorm > none (all splits of the "
             "pooled seeds enumerated; with 3 against 3 the smallest possible p is 0.05).", "",
             "| weights | statistic | LayerNorm seeds | no-norm seeds | ratio | U | p | n |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for weights in ("raw", "ema", "ema_0.999", "sphere_0.9999"):
        pixels = _pixels(res_dir, weights)
        for name, fn in STATISTICS.items() if all(pixels.get(n) for n in NORMS) else ():
            v = _per_seed(pixels, fn)
            t = rank_test(v["layernorm"], v["none"])
            seeds = " | ".join(", ".join(f"{x:.2e}" for x in v[n]) for n in NORMS)
            lines.append(f"| {weights} | {name} | {seeds} | {_ratio(v):.2f} | {t.u:g} of {t.n1 * t.n2} "
                         f"| {t.p:.3f} | {t.n1} vs {t.n2} |")
    lines += ["", "## The ratio of maxima depends on how many samples it is taken over", "",
              "LayerNorm / none of the seed median of max |x| over the first N samples of the shared noise "
              "set, at 50k:", "", "| weights | N = 10 | N = 100 | N = 1000 |", "|---|---:|---:|---:|"]
    for weights in ("raw", "ema"):
        pixels = _pixels(res_dir, weights)
        ratios = [_ratio(_per_seed(pixels, lambda a, n=n: a[:n].max())) for n in (10, 100, 1000)]
        lines.append(f"| {weights} | " + " | ".join(f"{v:.2f}" for v in ratios) + " |")
    lines += ["", "Index of the sample holding the largest |x|, per seed (0-based, same noise set for all):",
              ""]
    for weights in ("raw", "ema"):
        lines += [f"- {norm}, {weights}: {[int(seeds[s].max(axis=1).argmax()) for s in sorted(seeds)]}"
                  for norm, seeds in _pixels(res_dir, weights).items()]
    lines += ["", "## Weight norms per tensor (raw weights unless said)", ""]
    weight_rows = _rows(res_dir, "weights")
    l2 = {(r["norm"], r["seed"], r["step"], r["weights"], r["tensor"]): r["l2"] for r in weight_rows}
    for norm in NORMS:
        seeds = sorted({k[1] for k in l2 if k[0] == norm})
        gates = sorted({k[4] for k in l2 if k[0] == norm and k[4].endswith(".gates")})
        growth = [l2[norm, s, last, "raw", g] / l2[norm, s, first, "raw", g] - 1 for s in seeds for g in gates
                  if (norm, s, first, "raw", g) in l2 and (norm, s, last, "raw", g) in l2]
        lag = [l2[norm, s, last, "ema", g] / l2[norm, s, last, "raw", g] - 1 for s in seeds for g in gates
               if (norm, s, last, "ema", g) in l2]
        grown = [s for s in seeds if (norm, s, first, "raw", "writers") in l2]
        writers = [l2[norm, s, last, "raw", "writers"] / l2[norm, s, first, "raw", "writers"] - 1
                   for s in grown]
        lines.append(f"- {norm}: gate rows' norm, 10k -> 50k: {_pct_range(growth)} ({len(growth)} = seeds "
                     f"{grown} x blocks); pooled writers: {_pct_range(writers)}; EMA 0.9999 / raw - 1 of the "
                     f"gate rows at 50k: {_pct_range(lag)} (seeds {seeds} x blocks)")
    for norm in NORMS:
        mine = [r for r in weight_rows if (r["norm"], r["step"], r["weights"]) == (norm, last, "ema_0.999")]
        pooled = [r for r in mine if r["tensor"] == "writers"]
        lowest = min(mine, key=lambda r: r["cosine_to_raw"])
        change = [r["l2"] / l2[norm, r["seed"], last, "raw", "writers"] - 1 for r in pooled]
        cosine = [r["cosine_to_raw"] for r in pooled]
        lines.append(f"- {norm}, EMA 0.999 against raw at 50k: pooled writers' norm {_pct_range(change, 2)}, "
                     f"cosine {min(cosine):.4f} to {max(cosine):.4f} (n={len(cosine)}); lowest cosine of a "
                     f"single tensor {lowest['cosine_to_raw']:.4f} ({lowest['tensor']})")
    lines += ["", "## Each average against its own raw weights at 50k: seed median of the median |x|, "
              "average / raw", ""]
    errors = _rows(res_dir, "errors")
    for norm in NORMS:
        medians = {}
        for r in errors:
            if (r["norm"], r["step"]) == (norm, last):
                medians.setdefault(r["weights"], []).append(r["median"])
        raw = np.median(medians.pop("raw"))
        lines.append(f"- {norm}: " + ", ".join(f"{w} {np.median(v) / raw:.1f}x" for w, v in medians.items()))
    medians = {(r["norm"], r["step"]): r["median"] for r in errors if (r["weights"], r["seed"]) == ("raw", 1)}
    steps = sorted({s for n, s in medians if n == "layernorm"} & {s for n, s in medians if n == "none"})
    lines += ["", "## Seed 1, raw weights: LayerNorm / none of the median |x| at every checkpoint", "",
              "| step | " + " | ".join(f"{s // 1000}k" for s in steps) + " |", "|---|" + "---:|" * len(steps),
              "| ratio | " + " | ".join(f"{medians['layernorm', s] / medians['none', s]:.2f}" for s in steps)
              + " |"]
    pilot = Path(res_dir) / "pilot" / "raw" / "study_errors.csv"
    if pilot.exists():
        medians = {r["norm"]: float(r["median"]) for r in read_rows(pilot)
                   if r["measure"] == "abs_x" and int(r["step"]) == 50_000}
        lines += ["", "The one-seed pilot (`pilot/raw/study_errors.csv`), raw weights at 50k: "
                  f"LayerNorm / none of the median |x| {medians['layernorm'] / medians['none']:.2f}"]
    lines += ["", "## Perturbations: perturbed / raw median |x| (seed, step)", ""]
    raw = {(r["norm"], r["seed"], r["step"]): r["median"] for r in errors if r["weights"] == "raw"}
    perturbed = _rows(res_dir, "perturb")
    for direction, alpha in (("toward ema_0.999", 0.25), ("random", 0.25), ("random", 1.0)):
        for norm in NORMS:
            items = [(r["seed"], r["step"], r["median"] / raw[norm, r["seed"], r["step"]]) for r in perturbed
                     if (r["norm"], r["direction"], r["alpha"]) == (norm, direction, alpha)]
            shown = ", ".join(f"{v:.2f} ({s}, {step // 1000}k)" for s, step, v in items)
            lines.append(f"- {direction}, alpha {alpha:g}, {norm}: max {max(v for *_, v in items):.2f}; "
                         f"{shown}")
    return "\n".join(lines) + "\n"


def write_statistics(res_dir="res/paper", name="statistics.md"):
    """Write paper_statistics(res_dir) to res_dir/name; returns the path."""
    path = Path(res_dir) / name
    path.write_text(paper_statistics(res_dir))
    return path
