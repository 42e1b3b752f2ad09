"""The README's table of the toy at the paper schedule says what the committed res/paper/results.md says."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# README label -> the weights kind of direct.csv
KINDS = {"raw": "raw", "EMA 0.999": "ema_0.999", "EMA 0.9999 (DiT)": "ema",
         "sphere EMA 0.9999": "sphere_0.9999"}


def markdown_rows(lines):
    """The cells of each table row among lines, separator rows left out."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return [r for r in rows if not set("".join(r)) <= set("-:")]


def readme_paper_table(text):
    """{weights label: cells} of the README's table under 'The toy at the paper schedule'."""
    after = text[text.index("**The toy at the paper schedule**"):].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    end = next(i for i in range(start, len(after)) if not after[i].startswith("|"))
    header, *rows = markdown_rows(after[start:end])
    assert header[:4] == ["weights", "p50: LayerNorm", "no norm", "ratio"], header
    return {r[0]: r[1:] for r in rows}


def results_main_table(text):
    """{(weights kind, quantile): cells} of results.md's main direct table at t = 0."""
    section = text[text.index("(main table)"):]
    section = section[:section.index("\n## ")]
    rows = markdown_rows(section.splitlines())[1:]
    return {(r[1], r[3]): r[4:] for r in rows if r[0] == "zeros" and r[2] == "0"}


def seed_median(cell):
    """'3.15e-04 [2.41e-04, 3.69e-04] (n=3)' -> 3.15e-04, and n."""
    return float(cell.split()[0]), int(cell.rsplit("n=", 1)[1].rstrip(")"))


def test_the_readme_paper_table_is_the_committed_main_table():
    readme = readme_paper_table((ROOT / "README.md").read_text())
    results = results_main_table((ROOT / "res" / "paper" / "results.md").read_text())
    assert set(readme) == set(KINDS)
    for label, (ln, none, ratio, test, ratio_999, test_999) in readme.items():
        for quantile, ratio_, test_ in (("p50", ratio, test), ("p99.9", ratio_999, test_999)):
            pairs_, p_ = test_.split(", ")  # "pairs, p"
            ln_cell, none_cell, ratio_cell, pairs_cell, p_cell = results[(KINDS[label], quantile)]
            if quantile == "p50":
                assert (float(ln), float(none)) == (seed_median(ln_cell)[0], seed_median(none_cell)[0]), label
                assert seed_median(ln_cell)[1] == seed_median(none_cell)[1] == 3, label  # "3 a side"
            assert float(ratio_) == pytest.approx(float(f"{float(ratio_cell):.2g}")), (label, quantile)
            assert float(pairs_) == float(pairs_cell.split(" of ")[0]), (label, quantile)
            assert float(p_) == pytest.approx(round(float(p_cell.split()[0]), 2)), (label, quantile)
