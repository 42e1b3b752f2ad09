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
from ditnorm import analysis, checkpoint, measures, records, stats, tables
from ditnorm.presets import PRESETS, RECIPES, runs
from ditnorm.studies import toy as reports
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


def test_mnist_trains_the_small_size_first_then_matched_pairs_and_each_run_once():
    names = [name for name, _ in runs("mnist")]
    assert len(names) == len(set(names)) == 16
    assert names[6:10] == ["MnistDiT-XS-4-rmsnorm-seed0", "MnistDiT-XS-4-dyt-seed0",
                           "MnistDiT-S-4-layernorm-seed0", "MnistDiT-S-4-none-seed0"]
    once = [name for name, _ in runs("mnist", seeds=[1])]
    assert len(once) == len(set(once)) == 8 and once[4:6] == ["MnistDiT-S-4-layernorm-seed1",
                                                              "MnistDiT-S-4-none-seed1"]


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
    run = tmp_path / "tiny" / "res" / "runs" / "zeros-none-seed1"
    before = (run / "errors.csv").read_bytes()
    direct = (run / "direct.csv").read_bytes()
    (run / "direct.csv").unlink()  # measured before the direct statistic: it alone is measured again
    experiment.main(["measure", *flags])
    assert len(reads) == 10 and (run / "errors.csv").read_bytes() == before
    assert (run / "direct.csv").read_bytes() == direct
    errors = rows(tmp_path / "tiny" / "res" / "runs" / "zeros-none-seed1" / "errors.csv")
    assert [(r["step"], r["weights"], r["measure"]) for r in errors][:4] == [
        ("10", "ema", "abs_x"),
        ("10", "ema", "dev_const"),
        ("10", "raw", "abs_x"),
        ("10", "raw", "dev_const"),
    ]
    assert {r["step"] for r in rows(tmp_path / "tiny/res/runs/zeros-none-seed1/outliers.csv")} == {"20"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_damaged_measured_file_ends_measure_in_one_line_and_stays_as_it_was(tmp_path):
    fake_runs(tmp_path)
    flags = ["--preset", "tiny", "--results-dir", str(tmp_path), "--steps", "20"]
    experiment.main(["measure", *flags])
    bad = tmp_path / "tiny" / "res" / "runs" / "zeros-none-seed1" / "errors.csv"
    bad.write_text(bad.read_text() + "zeros,abs_x,none\n")  # a line cut short
    before = bad.read_bytes()
    with pytest.raises(SystemExit) as e:
        experiment.main(["measure", *flags[:-2]])
    assert str(e.value.code).startswith(f"error: {bad}: line ") and "\n" not in str(e.value.code)
    assert bad.read_bytes() == before


def test_a_retrained_run_is_not_measured_into_the_statistics_of_an_earlier_training(tmp_path):
    fake_runs(tmp_path)
    flags = ["--preset", "tiny", "--results-dir", str(tmp_path), "--steps", "20"]
    experiment.main(["measure", *flags])
    stats_root = tmp_path / "tiny" / "res" / "runs"
    recorded = json.loads((stats_root / "zeros-none-seed1" / "checkpoints.json").read_text())
    assert set(recorded) == {"10", "20"} and all(v.startswith("sha256:") for v in recorded.values())
    before = {p: p.read_bytes() for p in stats_root.rglob("*") if p.is_file()}
    # the run trained again (other weights at step 20): refused, nothing written
    fake_runs(tmp_path, steps=(20,))  # new weights: the seeds differ from the first call's step 20
    (tmp_path / "tiny" / "zeros-none-seed1" / "checkpoints" / "0000020.pt").write_bytes(
        (tmp_path / "tiny" / "zeros-none-seed0" / "checkpoints" / "0000020.pt").read_bytes())
    with pytest.raises(SystemExit, match=r"error: .*zeros-\w+-seed\d was measured from another training of "
                                         r"this run \(its checkpoint at step 20 differs"):
        experiment.main(["measure", *flags])
    assert {p: p.read_bytes() for p in stats_root.rglob("*") if p.is_file()} == before
    # statistics that never recorded their checkpoints are not added to either
    shutil.rmtree(stats_root)
    (stats_root / "zeros-none-seed0").mkdir(parents=True)
    (stats_root / "zeros-none-seed0" / "errors.csv").write_text("made elsewhere\n")
    with pytest.raises(SystemExit, match="holds statistics of checkpoints it did not record"):
        experiment.main(["measure", *flags])
    assert [p.name for p in stats_root.rglob("*")] == ["zeros-none-seed0", "errors.csv"]


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
    new = reports.headline_of(preset, rows_, ["CPU: x", "GPU: none"])
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
    assert [old[i].split()[:2] for i in differ] in ([], [["Made", "by"]])  # the source folder and date
    assert "not a 95% interval" in "\n".join(new) and "## The direct statistic" in "\n".join(new)
    for name in ("errors.csv", "weights.csv", "rms.csv", "perturb.csv", "direct.csv", "prediction.md"):
        assert (tmp_path / "paper" / "res" / name).read_bytes() == (
            ROOT / "res" / "paper" / name
        ).read_bytes()
    old, new = (
        json.loads((p / "headline.json").read_text()) for p in (res / "reproduce", new_res / "reproduce/res")
    )
    assert new["values"] == old["values"] and new["setup"] == old["setup"]
    for name in ("errors.csv", "direct.csv", "errors.md"):
        assert (new_res / "reproduce/res" / name).read_bytes() == (res / "reproduce" / name).read_bytes()
    legacy = ROOT / "res" / "reproduce" / "legacy"
    errors = (tmp_path / "reproduce" / "res" / "errors.md").read_text()
    for weights, path in (("EMA", legacy / "seeds" / "study_errors.md"),
                          ("raw", legacy / "seeds" / "raw" / "study_errors.md")):  # reports of 2026-12-01
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


def test_tiny_preset_end_to_end(tmp_path, capsys):
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
    # The direct statistic: its rows are what analysis.denoiser_x0_error gives on the checkpoint ...
    direct = PRESETS["tiny"]["measure_args"]["direct"]
    table_ = {}
    for norm in ("layernorm", "none"):
        run_rows = rows(res / "runs" / f"zeros-{norm}-seed0" / "direct.csv")
        assert list(run_rows[0]) == list(measures.DIRECT_COLUMNS)
        assert {(r["step"], r["weights"], r["timestep"]) for r in run_rows} == {
            (s, w, t) for s in ("10", "20") for w in ("ema", "raw") for t in ("0", "1", "10")
        }
        path = tmp_path / "tiny" / f"zeros-{norm}-seed0" / "checkpoints" / "0000020.pt"
        models, _, train_args = checkpoint.load_weights_kinds(path, ("raw",))
        expected = analysis.denoiser_x0_error(
            models["raw"], checkpoint.diffusion_of(train_args), timesteps=direct["timesteps"],
            num_inputs=direct["num_inputs"], seed=direct["noise_seed"] + 0, data="zeros"
        )
        for r in run_rows:
            assert r["noise_seed"] == "1000" and r["inputs"] == str(direct["num_inputs"])
            assert r["measure"] == "abs_x" and r["nonfinite"] == "0"
            if (r["step"], r["weights"]) == ("20", "raw"):
                for q in ("p50", "p99", "p99.9"):
                    assert float(r[q]) == pytest.approx(expected[int(r["timestep"])][q], rel=1e-9)
        # ... and the report's main table is each seed's median over its last checkpoints (here 10 and 20)
        table_[norm] = [float(np.median([float(r["p50"]) for r in run_rows
                                         if (r["weights"], r["timestep"]) == ("raw", "0")]))]
    results = (res / "results.md").read_text()
    line = next(x for x in results.splitlines() if x.startswith("| zeros | raw | 0 | p50 |"))
    test = stats.rank_test(table_["layernorm"], table_["none"])
    assert line == (
        f"| zeros | raw | 0 | p50 | {tables.cell(table_['layernorm'])} "
        f"| {tables.cell(table_['none'])} | {table_['layernorm'][0] / table_['none'][0]:.2f} "
        f"| {test.u:g} of 1 | {test.p:.3f} (0.500) |"
    )
    assert results.index("The direct statistic") < results.index("Headline")
    assert len(rows(res / "direct.csv")) == 2 * 2 * 2 * 3  # runs x steps x weights x timesteps
    # A run whose checkpoints are gone but whose record holds its last step is not trained again: another
    # training of it could not be measured into that record.
    shutil.rmtree(tmp_path / "tiny" / "zeros-none-seed0")
    capsys.readouterr()
    experiment.main(["train", *flags])
    assert not (tmp_path / "tiny" / "zeros-none-seed0").exists()
    assert "zeros-none-seed0: not trained;" in capsys.readouterr().out


def test_paper_statistics_of_every_weights_kind_incrementally(tmp_path, monkeypatch):
    tiny = dict(PRESETS["paper"], recipe="tiny", grid=dict(PRESETS["paper"]["grid"], model=["ToyDiT-XS/1"]),
                measure_args=dict(num_samples=20, sampling_steps=10, rms_batch=8, perturb_steps={0: (20,)},
                                  direct=dict(PRESETS["paper"]["measure_args"]["direct"], timesteps=(0,),
                                              num_inputs=512, last=1)))
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
    direct = rows(res / "runs" / "none-seed0" / "direct.csv")
    # the direct statistic only of the kinds the report tables, as the paper preset asks
    tabled = PRESETS["paper"]["measure_args"]["direct"]["weights"]
    assert set(tabled) < set(kinds)
    assert {(r["step"], r["weights"], r["timestep"]) for r in direct} == {("20", w, "0") for w in tabled}
    perturbed = rows(res / "runs" / "layernorm-seed0" / "perturb.csv")
    assert {r["step"] for r in perturbed} == {"20"} and len(perturbed) == 6
    (res / "runs" / "none-seed0" / "weights.csv").unlink()
    before = (res / "runs" / "none-seed0" / "errors.csv").read_bytes()
    experiment.main(["measure", *flags])  # only the statistics are measured again
    assert (res / "runs" / "none-seed0" / "weights.csv").is_file()
    assert (res / "runs" / "none-seed0" / "errors.csv").read_bytes() == before
    # statistics measured before checkpoints.json was kept (as the committed res/paper/runs were): adopted
    # when the checkpoints give back weights.csv exactly, and measured on (here the direct statistic)
    stats = res / "runs" / "none-seed0"
    (stats / "checkpoints.json").unlink()
    (stats / "direct.csv").unlink()
    experiment.main(["measure", *flags])
    assert (stats / "direct.csv").read_bytes() and (stats / "errors.csv").read_bytes() == before
    assert set(json.loads((stats / "checkpoints.json").read_text())) == {"10", "20"}
    # another training (its step 20 is not the one measured): refused, nothing written
    (stats / "checkpoints.json").unlink()
    ckpts = tmp_path / "paper-tiny" / "none-seed0" / "checkpoints"
    shutil.copy(ckpts / "0000010.pt", ckpts / "0000020.pt")
    written = {p: p.read_bytes() for p in res.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"none-seed0 was measured from another training of this run: at "
                                         r"step 20 the checkpoint on disk does not give its weights.csv"):
        experiment.main(["measure", *flags])
    assert {p: p.read_bytes() for p in res.rglob("*") if p.is_file()} == written
    shutil.copy(ROOT / "res" / "paper" / "prediction.md", res / "prediction.md")
    experiment.main(["report", *flags])
    assert "## Outcome" in (res / "prediction.md").read_text() and (res / "writer_norms.png").is_file()
    results = (res / "results.md").read_text()
    assert "| zeros | ema_0.999 | 0 | p99.9 |" in results and "| zeros | power_0.05 |" not in results
    assert results.index("The direct statistic") < results.index("## The sampled error")


def test_training_in_process_shows_each_runs_progress(tmp_path, capsys):
    experiment.main(["train", "--preset", "tiny", "--seeds", "0", "--jobs", "1", "--results-dir",
                     str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    for run in ("zeros-layernorm-seed0", "zeros-none-seed0"):  # a line every log_every steps, labelled
        steps = [line for line in out if line.startswith(f"{run}: [") and "] step " in line]
        assert [line.split("] step ")[1][:7] for line in steps] == [f"{s:07d}" for s in range(2, 21, 2)], out
