"""ditnorm.stats: the exact rank test, fixed quantiles, and the committed res/paper/statistics.md."""

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from ditnorm.records import read_rows, write_rows
from ditnorm.stats import (
    fixed_quantiles,
    paper_statistics,
    rank_test,
    smallest_stratified_p,
    stratified_rank_test,
)

ROOT = Path(__file__).resolve().parent.parent


def test_complete_separation_3_vs_3_gives_p_one_in_twenty():
    test = rank_test([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert (test.u, test.n1, test.n2) == (9.0, 3, 3)
    assert test.p == pytest.approx(1 / 20, abs=1e-15)


def test_eight_of_nine_pairs_gives_p_one_in_ten():
    # 2.5 < 3 is the one pair out of order; the splits with U >= 8 are the complete one and this one.
    test = rank_test([2.5, 5.0, 6.0], [1.0, 2.0, 3.0])
    assert test.u == 8.0
    assert test.p == pytest.approx(2 / 20, abs=1e-15)


def test_wrong_direction_is_not_significant():
    test = rank_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert (test.u, test.p) == (0.0, 1.0)


def test_ties_count_one_half_and_enter_the_null_distribution():
    # all equal: every split has U = n1 n2 / 2, so P(U >= observed) = 1
    assert rank_test([1.0, 1.0], [1.0, 1.0]) == (2.0, 1.0, 2, 2)
    # one tie across the groups: U = 3 + 0.5; p is the share of the 6 splits of {2, 3, 1, 2} with U >= 3.5
    test = rank_test([2.0, 3.0], [1.0, 2.0])
    assert test.u == 3.5
    pooled = [2.0, 3.0, 1.0, 2.0]
    splits = itertools.combinations(range(4), 2)
    us = [sum((a > b) + 0.5 * (a == b) for a in [pooled[i] for i in c]
              for b in [pooled[j] for j in range(4) if j not in c]) for c in splits]
    assert test.p == pytest.approx(np.mean([u >= 3.5 for u in us]))


@pytest.mark.parametrize("n1,n2", [(3, 3), (3, 4), (5, 2), (6, 6)])
def test_agrees_with_scipy_exact_without_ties(n1, n2):
    rng = np.random.default_rng(n1 * 10 + n2)
    for _ in range(5):
        x, y = rng.normal(size=n1) + rng.uniform(0, 2), rng.normal(size=n2)
        ours = rank_test(x, y)
        theirs = scipy.stats.mannwhitneyu(x, y, alternative="greater", method="exact")
        assert ours.u == pytest.approx(theirs.statistic)
        assert ours.p == pytest.approx(theirs.pvalue, rel=1e-12)


def test_empty_group_raises():
    with pytest.raises(ValueError, match="both groups"):
        rank_test([], [1.0])


def test_the_stratified_test_is_exact_on_a_case_checked_by_hand():
    # stratum 1: 2 against 1, U = 2 (both above); its 3 splits give U = 2, 1, 0. stratum 2: 1 against 1,
    # U = 1; its 2 splits give 1, 0. The sum is 3 only when both are at their top: p = 1/3 * 1/2.
    test = stratified_rank_test([([3.0, 2.0], [1.0]), ([5.0], [4.0])])
    assert (test.u, test.n1, test.n2) == (3.0, 3, 2)
    assert test.p == pytest.approx(1 / 6, abs=1e-15)
    assert smallest_stratified_p([(2, 1), (1, 1)]) == pytest.approx(1 / 6)
    # two sizes at 3 against 3, complete separation in both: 1/400, the smallest the design allows
    top = stratified_rank_test([([4, 5, 6], [1, 2, 3]), ([14, 15, 16], [11, 12, 13])])
    assert (top.u, top.p) == (18.0, pytest.approx(1 / 400))
    assert smallest_stratified_p([(3, 3)] * 2) == pytest.approx(1 / 400)
    # within strata only: the second stratum's none values lie above the first's layernorm ones, which a test
    # pooling the strata would count against layernorm; stratified, each stratum is separated
    assert stratified_rank_test([([1, 2, 3], [0, 0.5, 0.7]), ([11, 12, 13], [10, 10.5, 10.7])]).p == \
        pytest.approx(1 / 400)


def test_the_stratified_p_is_the_share_of_within_stratum_relabellings_and_one_stratum_is_rank_test():
    strata = [([2.0, 3.0], [1.0, 2.0]), ([0.5, 0.1, 0.9], [0.2, 0.5])]  # ties inside the first and second
    observed = stratified_rank_test(strata)

    def splits(x, y):  # every relabelling of one stratum: U of each
        pooled, n = [*x, *y], len(x)
        for chosen in itertools.combinations(range(len(pooled)), n):
            a = [pooled[i] for i in chosen]
            b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
            yield sum((u > v) + 0.5 * (u == v) for u in a for v in b)

    sums = [u1 + u2 for u1, u2 in itertools.product(splits(*strata[0]), splits(*strata[1]))]
    assert observed.u == 3.5 + 3.5
    assert observed.p == pytest.approx(np.mean([s >= observed.u for s in sums]), abs=1e-15)
    assert stratified_rank_test(strata[:1]) == rank_test(*strata[0])


def test_fixed_quantiles_names_and_values():
    q = fixed_quantiles(np.arange(1001.0))
    assert q == {"p50": 500.0, "p99": 990.0, "p99.9": 999.0}
    assert np.isnan(fixed_quantiles([np.nan])["p50"])


def test_committed_statistics_are_what_the_function_writes():
    committed = (ROOT / "res/paper/statistics.md").read_text()
    assert paper_statistics(ROOT / "res/paper") == committed


# the steps seed 0's folders held when legacy/statistics.md was written
LEGACY_SEED0_STEPS = {"layernorm-seed0": {5_000, 10_000, 40_000, 45_000, 50_000},
                      "none-seed0": {40_000, 45_000, 50_000}}


def legacy_paper_record(tmp_path):
    """res/paper as it stood with the Intel Xeon's seed 2 (res/paper/legacy/runs/): seeds 0 and 1 of runs/,
    that seed 2, the pilot, and the report's pooled csv files rebuilt from the runs' own."""
    res = ROOT / "res/paper"
    for run in [*sorted(res.glob("runs/*-seed[01]")), *sorted(res.glob("legacy/runs/*-seed2"))]:
        shutil.copytree(run, tmp_path / "runs" / run.name)
    # seed 0 has since been measured at the steps it then lacked: keep the rows it had (seed 1 had all)
    for name, steps in LEGACY_SEED0_STEPS.items():
        for path in (tmp_path / "runs" / name).glob("*.csv"):
            rows = read_rows(path)
            if rows and "step" in rows[0]:
                write_rows(path, [r for r in rows if int(r["step"]) in steps])
    shutil.copytree(res / "pilot", tmp_path / "pilot")
    for name in ("errors", "weights", "perturb"):
        write_rows(tmp_path / f"{name}.csv",
                   [r for path in sorted(tmp_path.glob(f"runs/*/{name}.csv")) for r in read_rows(path)])
    return tmp_path


def test_the_legacy_statistics_and_the_issue_numbers_recompute(tmp_path):
    text = paper_statistics(legacy_paper_record(tmp_path))
    assert text == (ROOT / "res/paper/legacy/statistics.md").read_text()
    # raw medians and both maxima separate completely; EMA medians order 8 of 9 pairs
    assert "| raw | median |" in text and "| 4.24 | 9 of 9 | 0.050 | 3 vs 3 |" in text
    assert "| 8.73 | 9 of 9 | 0.050 |" in text and "| 7.88 | 9 of 9 | 0.050 |" in text
    assert "| 4.51 | 8 of 9 | 0.100 |" in text
