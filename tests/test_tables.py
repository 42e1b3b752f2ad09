"""ditnorm/tables.py and records.read_rows: the one reader, the one formatter, Holm's correction and a
declared table grouped by any grid key (an intervention x norm grid as the lead's study will have)."""

import pytest

from ditnorm import records, tables


def test_the_cell_is_median_min_max_with_its_count():
    assert tables.cell([3.0, 1.0, 2.0, float("nan"), None]) == "2.00e+00 [1.00e+00, 3.00e+00] (n=3)"
    assert tables.cell([0.5], "{:.3f}", lone=True) == "0.500 (n=1)"
    assert tables.cell([0.5], ".1f") == "0.5 [0.5, 0.5] (n=1)"
    assert tables.cell([2.0, 4.0], ".1f", count=False) == "3.0 [2.0, 4.0]"
    assert tables.cell([]) == "-" and tables.cell([float("inf")]) == "-"


def test_holm_multiplies_the_kth_smallest_by_m_minus_k_plus_one_and_keeps_the_order():
    assert tables.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert tables.holm([0.05, None, 0.05]) == [0.1, None, 0.1]
    assert tables.holm([0.5, 0.6]) == [1.0, 1.0]  # at most 1
    assert tables.holm([]) == []


def test_a_table_groups_by_any_grid_key_and_tests_the_seeds_within_each_line():
    base = {"dropout": 10.0, "cap": 0.0}
    shift = {"layernorm": 100.0, "none": 0.0}
    rows = [dict(intervention=iv, norm=norm, seed=seed, step=step,
                 loss=base[iv] + shift[norm] + seed + step / 10)
            for iv in base for norm in shift for seed in range(3) for step in (1, 3)]
    table = tables.Table(lines=("intervention",), value="loss", holm=True, fmt=".1f")
    head, sep, *body = tables.render(table, rows)
    assert head == ("| intervention | layernorm | none | layernorm / none | pairs layernorm > none "
                    "| p, exact one-sided (smallest possible) | p, Holm over the table's lines |")
    assert sep == "|---|---|---|---:|---:|---:|---:|"
    # each seed's value is the median over its two steps (seed + 0.2 above the base)
    assert body[0] == ("| dropout | 111.2 [110.2, 112.2] (n=3) | 11.2 [10.2, 12.2] (n=3) | 9.93 | 9 of 9 "
                       "| 0.050 (0.050) | 0.100 |")
    assert body[1].startswith("| cap | 101.2 [100.2, 102.2] (n=3) | 1.2 [0.2, 2.2] (n=3) |")
    assert body[1].endswith("| 9 of 9 | 0.050 (0.050) | 0.100 |")
    # the columns may be a grid key pair too, the lines another key, and a line may lack a side
    by_pair = tables.Table(lines=("step",), value="loss", across=("intervention", "norm"),
                           test=(("cap", "layernorm"), ("cap", "none")), fmt=".1f")
    head, _, first, _ = tables.render(by_pair, rows)
    assert head.startswith("| step | dropout layernorm | dropout none | cap layernorm | cap none "
                           "| cap layernorm / cap none |")
    assert first.startswith("| 1 | 111.1 [110.1, 112.1] (n=3) |")
    alone = tables.render(tables.Table(lines=("intervention",), value="loss"),
                          [r for r in rows if r["norm"] == "none"])
    assert alone[2].endswith("| - | - | - |")


def test_long_rows_make_a_statistic_a_line_key():
    rows = tables.long([dict(norm="none", seed=0, p50=1.0, p99=2.0)], ("p50", "p99"))
    assert rows == [dict(norm="none", seed=0, statistic="p50", value=1.0),
                    dict(norm="none", seed=0, statistic="p99", value=2.0)]


def test_the_one_reader_converts_by_column_and_names_a_bad_file(tmp_path):
    path = tmp_path / "errors.csv"
    assert records.read_rows(path) == []
    path.write_text("norm,seed,step,median\nnone,0,10,0.5\n")
    assert records.read_rows(path) == [dict(norm="none", seed="0", step="10", median="0.5")]
    assert records.read_rows(path, ("norm", "median"), ints=("seed", "step")) == [
        dict(norm="none", seed=0, step=10, median=0.5)]
    with pytest.raises(records.RowsError, match="no max column"):
        records.read_rows(path, ("norm", "max"))
    with pytest.raises(records.RowsError, match="not"):
        records.read_rows(path, ("norm", "seed"), exact=True)
    path.write_text("norm,seed,step,median\nnone,0,10\n")
    with pytest.raises(records.RowsError, match="line 2 has fewer cells"):
        records.read_rows(path)
    path.write_text("norm,seed,step,median\nnone,0,ten,0.5\n")
    with pytest.raises(records.RowsError, match="errors.csv"):
        records.read_rows(path, ints=("seed", "step"))
