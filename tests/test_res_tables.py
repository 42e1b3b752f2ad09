"""Every committed res/ table that its per-run rows determine is what the report phase writes from them,
byte for byte: the report of each preset reruns on a copy of res/<preset>/ (figures deleted first, so
they must be made again), given the moment and machine the committed report names.

Not recomputed here: the notebooks' tables (toydit_errors.md, token_outliers.md; they need the run
folders' checkpoints, which git does not keep), and the reports of the runner's predecessors under
legacy/ and pilot/, written by earlier versions of the reports (tests/test_experiment.py and
tests/test_stats.py compare the tables of theirs that today's code still writes)."""

import datetime
import re
import shutil
from pathlib import Path

import pytest

import experiment
from ditnorm import stats
from ditnorm.presets import PRESETS, runs

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "study": ("errors.md", "errors.csv", "prediction.md"),
    "paper": ("results.md", "prediction.md", "errors.csv", "weights.csv", "rms.csv", "perturb.csv",
              "direct.csv"),
    "reproduce": ("errors.md", "errors.csv", "direct.csv", "headline.md", "headline.json", "results.md"),
    "mnist": ("results.md",),
}
FIGURES = {
    "study": ("error_vs_step.png",),
    "paper": ("error_vs_step.png", "averages_at_last_step.png", "writer_norms.png"),
    "reproduce": ("headline.png", "dit_block.png"),
    "mnist": ("curves.png",),
}


def made(text):
    """(moment, machine lines) a committed report names: its 'Made by ... on <date>' and its hardware list."""
    when = re.search(r"^Made by .* on (\d{4}-\d\d-\d\d(?:T[\d:]+)?)\.$", text, re.M)
    machine = re.findall(r"^- ((?:CPU:|GPU:|torch ).*)$", text, re.M)
    return (datetime.datetime.fromisoformat(when[1]) if when else None), machine or None


def skipped_cut(name, text):
    """results.md of reproduce up to its Skipped section: which notebook parts were skipped depends on the
    run folders (absent here), not on the rows."""
    return text.split("\n## Skipped\n")[0] if name == "reproduce" else text


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_committed_tables_are_what_report_writes_from_the_committed_rows(tmp_path, name):
    committed = ROOT / "res" / name
    record = tmp_path / "res" / name
    shutil.copytree(committed, record)
    for figure in FIGURES[name]:
        (record / figure).unlink()
    now, machine = made((committed / "results.md").read_text()) if name != "study" else (None, None)
    experiment.report(name, PRESETS[name], runs(name), record, tmp_path / "results" / name, now=now,
                      machine=machine)
    for table in TABLES[name]:
        new, old = (record / table).read_bytes(), (committed / table).read_bytes()
        if table == "results.md":
            new, old = (skipped_cut(name, t.decode()).encode() for t in (new, old))
        assert new == old, f"res/{name}/{table} differs from what report writes"
    for figure in FIGURES[name]:
        assert (record / figure).stat().st_size > 0, figure


def test_the_paper_statistics_are_what_their_command_writes():
    assert stats.paper_statistics(ROOT / "res/paper") == (ROOT / "res/paper/statistics.md").read_text()
