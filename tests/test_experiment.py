"""experiment.py and its presets: a tiny preset end to end, incremental measurement, kill-safe files, and the
committed res/ tables recomputed from their per-run files."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import perturb_zero_init, save_model

import experiment
from ditnorm import analysis, checkpoint, measures, records, reports
from ditnorm.presets import PRESETS, RECIPES, runs
from models import build_model

ROOT = Path(__file__).resolve().parents[1]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fake_runs(results, preset="tiny", steps=(10, 20)):
    """Run folders of the preset's grid with random-ish checkpoints (no training)."""
    for i, (name, cfg) in enumerate(runs(preset)):
        for k, step in enumerate(steps):
            model = perturb_zero_init(build_model(cfg["model"], norm=cfg["norm"]), seed=10 * i + k)
            save_model(model, cfg["model"], results / preset / name / "checkpoints" / f"{step:07d}.pt", step)


def test_the_grid_names_its_runs_and_every_recipe_is_used():
    assert [name for name, _ in runs("paper")][:2] == ["layernorm-seed0", "layernorm-seed1"]
    assert runs("study")[0][0] == "zeros-layernorm-seed0" and len(runs("study")) == 48
    assert [cfg["seed"] for _, cfg in runs("reproduce", seeds=[4])] == [4, 4]
    assert {p["recipe"] for p in PRESETS.values()} == set(RECIPES)


def test_measure_is_incremental_and_reads_each_checkpoint_once(tmp_path, monkeypatch):
    fake_runs(tmp_path)
    reads = []
    monkeypatch.setattr(
        checkpoint,
        "read_checkpoint",
        lambda path, _read=checkpoint.read_checkpoint: reads.append(path) or _read(path),
    )
    flags = ["--preset", "tiny", "--results-dir", str(tmp_path)]
    experiment.main(["measure", *flags, "--steps", "20"])
    assert len(reads) == 4  # 4 runs x 1 checkpoint, both weights kinds from one read
    experiment.main(["measure", *flags])
    assert len(reads) == 8  # only step 10 was left
    experiment.main(["measure", *flags])
    assert len(reads) == 8
    errors = rows(tmp_path / "tiny" / "res" / "runs" / "zeros-none-seed1" / "errors.csv")
    assert [(r["step"], r["weights"], r["measure"]) for r in errors][:4] == [
        ("10", "ema", "abs_x"),
        ("10", "ema", "dev_const"),
        ("10", "raw", "abs_x"),
        ("10", "raw", "dev_const"),
    ]
    assert {r["step"] for r in rows(tmp_path / "tiny/res/runs/zeros-none-seed1/outliers.csv")} == {"20"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_row_is_what_sampling_the_checkpoint_gives(tmp_path):
    fake_runs(tmp_path)
    experiment.main(["measure", "--preset", "tiny", "--results-dir", str(tmp_path), "--steps", "20"])
    samples, _ = analysis.sample_checkpoint(
        tmp_path / "tiny/zeros-layernorm-seed1/checkpoints/0000020.pt",
        20,
        num_sampling_steps=10,
        use_ema=False,
    )
    row = next(
        r
        for r in rows(tmp_path / "tiny/res/runs/zeros-layernorm-seed1/errors.csv")
        if (r["weights"], r["measure"]) == ("raw", "abs_x")
    )
    assert float(row["median"]) == measures.error_stats(samples)["median"]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    records.write_rows(path, [dict(step=1, x=1.5)])
    before = path.read_bytes()

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(records.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        records.write_rows(path, [dict(step=1, x=1.5), dict(step=2, x=2.5)])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_report_of_the_tiny_preset_writes_the_headline_and_skips_the_notebooks_without_runs(tmp_path, capsys):
    fake_runs(tmp_path)
    flags = ["--preset", "tiny", "--results-dir", str(tmp_path)]
    experiment.main(["measure", *flags])
    shutil.rmtree(tmp_path / "tiny" / "zeros-none-seed0")  # the notebooks need seed 0 of both norms
    experiment.main(["report", *flags])
    res = tmp_path / "tiny" / "res"
    headline = json.loads((res / "headline.json").read_text())
    assert headline["setup"]["seeds"] == 2 and len(headline["values"]["raw"]["none max"]) == 2
    assert "SKIPPED both notebooks" in (res / "results.md").read_text()
    for name in ("headline.md", "headline.png", "errors.md", "dit_block.png"):
        assert (res / name).stat().st_size > 0


def test_the_comparison_says_where_each_new_median_falls():
    rows_ = [
        dict(measure="abs_x", weights=w, norm=n, seed=s, step=5, median=1.0 + s, max=10.0 + s)
        for w in ("ema", "raw")
        for n in ("layernorm", "none")
        for s in range(3)
    ]
    preset = dict(PRESETS["reproduce"], cfg=runs("reproduce")[0][1])
    new = reports.headline_of(preset, rows_)
    assert reports.compare(new, new)[-1] == "8 of 8 new seed medians fall inside the committed seed ranges."
    low = json.loads(json.dumps(new))
    low["values"]["ema"]["none max"] = [1.0, 2.0, 3.0]
    assert "outside: ema none max" in reports.compare(new, low)[-1]
    assert "another configuration" in reports.compare(new, dict(new, setup=dict(new["setup"], seeds=6)))[0]


def test_prediction_outcome_on_hand_made_rows():
    medians = {
        ("zeros", "layernorm"): 2.0,
        ("zeros", "none"): 1.0,
        ("zeros", "rmsnorm"): 2.0,
        ("zeros", "dyt"): 1.0,
        ("constant", "layernorm"): 8.0,
        ("constant", "none"): 2.0,
        ("constant", "rmsnorm"): 6.0,
        ("constant", "dyt"): 3.0,
    }
    rows_ = [
        dict(
            data=d,
            measure="dev_const",
            norm=n,
            seed=s,
            step=10,
            median=m * (1 + 0.01 * s),
            ks_c=0.05 if d == "constant" else np.nan,
        )
        for (d, n), m in medians.items()
        for s in range(3)
    ]
    rows_ += [dict(r, step=5, median=100.0) for r in rows_]  # an earlier checkpoint must be ignored
    held = {name: ok for name, ok, _ in reports.prediction_outcome(rows_)}
    assert held == {"P1": True, "P2": True, "P3": True, "P4": True}
    rows_ = [dict(r, median=0.5) if (r["data"], r["norm"]) == ("constant", "dyt") else r for r in rows_]
    held = {name: ok for name, ok, _ in reports.prediction_outcome(rows_)}
    assert held["P1"] is False and held["P3"] is True


def table(text, heading):
    start = text.index("|", text.index(heading))
    end = text.find("\n\n", start)
    return text[start : end if end > 0 else None].strip()


@pytest.mark.parametrize("seeds", [None, "0,1,2"])
def test_the_committed_study_tables_are_what_report_recomputes(tmp_path, seeds):
    shutil.copytree(ROOT / "res" / "study", tmp_path / "study" / "res")
    experiment.main(
        [
            "report",
            "--preset",
            "study",
            "--results-dir",
            str(tmp_path),
            *(["--seeds", seeds] if seeds else []),
        ]
    )
    legacy = (
        ROOT / "res" / "study" / "legacy" / ("study_errors_3seeds.md" if seeds else "study_errors_6seeds.md")
    )
    new = (tmp_path / "study" / "res" / "errors.md").read_text()
    for heading in ("## Last checkpoint", "## Every checkpoint"):
        assert table(new, heading) == table(legacy.read_text(), heading)
    outcome = (
        ROOT / "res" / "study" / ("legacy/study_prediction_3seeds.md" if seeds else "prediction.md")
    ).read_text()
    assert (tmp_path / "study/res/prediction.md").read_text().split("## Outcome")[1] == outcome.split(
        "## Outcome"
    )[1]


def test_the_committed_paper_and_reproduce_numbers_are_what_report_recomputes(tmp_path):
    for preset in ("paper", "reproduce"):
        shutil.copytree(ROOT / "res" / preset, tmp_path / preset / "res")
        experiment.main(["report", "--preset", preset, "--results-dir", str(tmp_path)])
    res, new_res = ROOT / "res", tmp_path
    old, new = ((p / "results.md").read_text().splitlines() for p in (res / "paper", new_res / "paper/res"))
    differ = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    assert [old[i].split()[:3] for i in differ] == [
        ["Made", "by", "`python"],
        ["Exploratory,", "after", "the"],
    ]
    for name in ("errors.csv", "weights.csv", "rms.csv", "perturb.csv", "prediction.md"):
        assert (tmp_path / "paper" / "res" / name).read_bytes() == (
            ROOT / "res" / "paper" / name
        ).read_bytes()
    old, new = (
        json.loads((p / "headline.json").read_text()) for p in (res / "reproduce", new_res / "reproduce/res")
    )
    assert new["values"] == old["values"] and new["setup"] == old["setup"]
    legacy = ROOT / "res" / "reproduce" / "legacy" / "seeds"
    errors = (tmp_path / "reproduce" / "res" / "errors.md").read_text()
    for weights, path in (("EMA", legacy / "study_errors.md"), ("raw", legacy / "raw" / "study_errors.md")):
        assert table(errors, f"## {weights} weights, every checkpoint") == table(
            path.read_text(), "## Every checkpoint"
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "0,x"], "comma-separated list of seeds"),
        (["--preset", "nope"], "invalid choice"),
        (["--steps", "0"], "positive steps"),
    ],
)
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        experiment.main(["measure", *(["--preset", "tiny"] if "--preset" not in flags else []), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_tiny_preset_end_to_end(tmp_path):
    pytest.importorskip("ditnorm.trainer")
    flags = ["--preset", "tiny", "--seeds", "0", "--results-dir", str(tmp_path)]
    for phase in ("train", "measure", "report"):
        experiment.main([phase, *flags])
    res = tmp_path / "tiny" / "res"
    assert {p.name for p in (res / "runs").iterdir()} == {"zeros-layernorm-seed0", "zeros-none-seed0"}
    assert (res / "toydit_errors.md").is_file() and (res / "token_outliers.md").is_file()
    before = {p: p.read_bytes() for p in (res / "runs").rglob("*.csv")}
    experiment.main(["train", *flags])  # finished: nothing to train
    experiment.main(["measure", *flags])  # measured: nothing to measure
    assert {p: p.read_bytes() for p in (res / "runs").rglob("*.csv")} == before


def test_paper_statistics_of_every_weights_kind_incrementally(tmp_path, monkeypatch):
    tiny = dict(PRESETS["paper"], recipe="tiny", grid=dict(PRESETS["paper"]["grid"], model=["ToyDiT-XS/1"]),
                measure_args=dict(num_samples=20, sampling_steps=10, rms_batch=8, perturb_steps={0: (20,)}))
    monkeypatch.setitem(PRESETS, "paper-tiny", tiny)
    flags = ["--preset", "paper-tiny", "--seeds", "0", "--results-dir", str(tmp_path)]
    experiment.main(["train", *flags, "--jobs", "2"])  # side by side, in a process pool
    experiment.main(["measure", *flags])
    res = tmp_path / "paper-tiny" / "res"
    errors = rows(res / "runs" / "none-seed0" / "errors.csv")
    kinds = measures.PAPER_WEIGHTS
    assert {(r["step"], r["weights"]) for r in errors} == {(s, w) for s in ("10", "20") for w in kinds}
    tensors = {r["tensor"] for r in rows(res / "runs" / "none-seed0" / "weights.csv")}
    assert {"writers", "all", "x_embedder", "block0.attn.proj", "block1.mlp.fc2", "block0.gates"} <= tensors
    assert {r["block"] for r in rows(res / "runs" / "none-seed0" / "rms.csv")} == {"0", "1"}
    perturbed = rows(res / "runs" / "layernorm-seed0" / "perturb.csv")
    assert {r["step"] for r in perturbed} == {"20"} and len(perturbed) == 6
    (res / "runs" / "none-seed0" / "weights.csv").unlink()
    before = (res / "runs" / "none-seed0" / "errors.csv").read_bytes()
    experiment.main(["measure", *flags])  # only the statistics are measured again
    assert (res / "runs" / "none-seed0" / "weights.csv").is_file()
    assert (res / "runs" / "none-seed0" / "errors.csv").read_bytes() == before
    shutil.copy(ROOT / "res" / "paper" / "prediction.md", res / "prediction.md")
    experiment.main(["report", *flags])
    assert "## Outcome" in (res / "prediction.md").read_text() and (res / "writer_norms.png").is_file()
