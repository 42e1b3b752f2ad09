"""The report engine under every study: a `Table` declares its lines (any grid keys), its columns (norm by
default) and its test; `render` writes it, each cell the seed median [min, max] (n seeds) of each seed's
value, the test stats.rank_test (or its stratified form) with Holm's adjustment beside it when asked."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ditnorm.records import grouped, seed_spread, write_atomic
from ditnorm.stats import rank_test, smallest_p, smallest_stratified_p, stratified_rank_test


def long(rows, statistics, key="statistic"):
    """One row per (row, statistic): the row's other keys, key=statistic and value=its value."""
    return [{**{k: v for k, v in row.items() if k not in statistics}, key: s, "value": row[s]}
            for row in rows for s in statistics]


def number(value, fmt):
    """value in fmt: a format spec ('.2e') or a format string ('{:.3f}')."""
    return fmt.format(value) if "{" in fmt else format(value, fmt)


def cell(values, fmt=".2e", count=True, lone=False, empty="-", spread=True):
    """'median [min, max] (n=k)' of the finite values (None and nan left out); without the count when not
    count, the median alone when not spread, 'value (n=1)' for a single one when lone; `empty` for none."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return empty
    n = f" (n={len(values)})" if count else ""
    if not spread:
        return f"{number(float(np.median(values)), fmt)}{n}"
    if lone and len(values) == 1:
        return f"{number(values[0], fmt)}{n}"
    med, low, high = seed_spread(values)
    return f"{number(med, fmt)} [{number(low, fmt)}, {number(high, fmt)}]{n}"


def holm(ps):
    """Holm's step-down adjustment of the p-values ps (None left as None), in their order: the k-th
    smallest of m is multiplied by m - k + 1, kept at least its predecessor's and at most 1."""
    known = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out, running = list(ps), 0.0
    for k, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - k) * p))
        out[i] = running
    return out


def rank_cells(x, y):
    """(cells, p) of the test of x > y: the ratio of the medians, the pairs ordered that way (a tie 1/2)
    and the exact one-sided p with, in brackets, the smallest its counts allow; '-' cells without both."""
    x, y = [v for v in x if v is not None], [v for v in y if v is not None]
    if not x or not y:
        return ["-", "-", "-"], None
    test = rank_test(x, y)
    return [f"{np.median(x) / np.median(y):.2f}", f"{test.u:g} of {test.n1 * test.n2}",
            f"{test.p:.3f} ({smallest_p(test.n1, test.n2):.3f})"], test.p


RANK_HEADS = ("{x} / {y}", "pairs {x} > {y}", "p, exact one-sided (smallest possible)")


def pairs_cell(x, y):
    """(['u/total, p = ...'], p) of the test of x > y; 'n < 2' below two values a side."""
    x, y = [v for v in x if v is not None], [v for v in y if v is not None]
    if len(x) < 2 or len(y) < 2:
        return ["n < 2"], None
    test = rank_test(x, y)
    return [f"{test.u:g}/{test.n1 * test.n2}, p = {test.p:.2f}"], test.p


def strata_cells(strata):
    """(['u of total', 'p (smallest possible)'], p) of the stratified exact test of x > y over strata
    [(x, y), ...] (stats.stratified_rank_test; a stratum without values on both sides left out)."""
    strata = [(x, y) for x, y in ([[v for v in side if v is not None] for side in pair] for pair in strata)
              if x and y]
    if not strata:
        return ["-", "-"], None
    test, sizes = stratified_rank_test(strata), [(len(x), len(y)) for x, y in strata]
    return [f"{test.u:g} of {sum(a * b for a, b in sizes)}",
            f"{test.p:.4f} ({smallest_stratified_p(sizes):.4f})"], test.p


STRATA_HEADS = ("pairs {x} > {y}, summed over {strata}", "p, stratified exact one-sided (smallest possible)")


@dataclass(frozen=True)
class Table:
    """A table: a line per value of the `lines` keys (first-seen order), a column per value of `across`
    (a key or a tuple of keys; `order` picks and orders the columns, else first-seen), each cell the spread
    over `unit` of each unit's value of `value` (the median of its rows), then the test of column test[0]
    against test[1] over units (test_cells: rank_cells or pairs_cell), and Holm's adjusted p when holm.

    heads: the header of a line key (default its name), names: of a column (default its value); right: the
    line keys whose column is right-aligned; fmt: a format for every cell, or {value of `fmt_key` (a line
    key or the across key): format}; p_fmt: of Holm's p. strata: across is (strata key, key) and the test,
    test_cells([(x, y) per stratum]) (strata_cells), compares (s, test[0]) with (s, test[1]) in each s."""

    lines: tuple
    value: str = "value"
    across: str | tuple = "norm"
    order: tuple = ()
    unit: str = "seed"
    test: tuple | None = ("layernorm", "none")
    test_cells: object = rank_cells
    test_heads: tuple = RANK_HEADS
    test_align: str = "---:"
    holm: bool = False
    fmt: str | dict = ".2e"
    fmt_key: str = "statistic"
    count: bool = True
    lone: bool = False
    spread: bool = True
    heads: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)
    right: tuple = ()
    strata: str | None = None
    p_fmt: str = ".3f"


def _column(row, across):
    return tuple(row[k] for k in across) if isinstance(across, tuple) else row[across]


def unit_values(rows, table):
    """{column: [per unit: the median of its rows' values, None if none has one]} of one line's rows."""
    out = {}
    for (col, _), group in grouped([{**r, "_col": _column(r, table.across)} for r in rows], "_col",
                                   table.unit).items():
        values = [float(r[table.value]) for r in group if r[table.value] is not None]
        out.setdefault(col, []).append(float(np.median(values)) if values else None)
    return out


def _format(table, line, column):
    """The format of one cell."""
    if isinstance(table.fmt, str):
        return table.fmt
    return table.fmt[line[table.lines.index(table.fmt_key)] if table.fmt_key in table.lines else column]


def render(table, rows):
    """The markdown lines of the table over rows: header, separator, a line per group."""
    columns = list(table.order or dict.fromkeys(_column(r, table.across) for r in rows))
    names = [table.names.get(c, " ".join(map(str, c)) if isinstance(c, tuple) else str(c)) for c in columns]
    heads = [table.heads.get(k, k) for k in table.lines] + names
    align = ["---:" if k in table.right else "---" for k in table.lines] + ["---"] * len(columns)
    if table.test:
        x, y = (" ".join(map(str, c)) if isinstance(c, tuple) else c for c in table.test)
        heads += [h.format(x=x, y=y, strata=table.strata) for h in table.test_heads]
        align += [table.test_align] * len(table.test_heads)
        if table.holm:
            heads.append("p, Holm over the table's lines")
            align.append(table.test_align)
    body, ps = [], []
    for key, group in grouped(rows, *table.lines).items():
        values = unit_values(group, table)
        cells = [*map(str, key)] + [cell(values.get(c, []), _format(table, key, c), table.count, table.lone,
                                         spread=table.spread) for c in columns]
        if table.test:
            tested, p = (table.test_cells([tuple(values.get((s, side), []) for side in table.test)
                                           for s in dict.fromkeys(c[0] for c in columns)]) if table.strata
                         else table.test_cells(*(values.get(side, []) for side in table.test)))
            cells += tested
            ps.append(p)
        body.append(cells)
    if table.test and table.holm:
        for cells, p in zip(body, holm(ps), strict=True):
            cells.append("-" if p is None else format(p, table.p_fmt))
    return ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(cells) + " |" for cells in body)]


def write_outcome(path, lines, head=""):
    """Replace what follows '## Outcome' in a prediction file with lines (the predictions above it stay as
    written); a missing file is written as head and the outcome."""
    if Path(path).is_file():
        head = Path(path).read_text().split("## Outcome", 1)[0]
    write_atomic(path, head + "## Outcome\n\n" + "\n".join(lines) + "\n")
