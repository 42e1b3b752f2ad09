import csv

import numpy as np
import pytest
import torch

import study
from ditnorm import analysis
from ditnorm.checkpoint import load_model
from models import build_model


def test_error_stats_on_a_hand_made_array():
    values = np.concatenate([np.arange(1.0, 101.0), [np.nan, np.inf, -np.inf]])  # 1..100 and 3 non-finite
    stats = study.error_stats(values)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["median"] == pytest.approx(50.5)
    assert stats["p99"] == pytest.approx(99.01)  # numpy's linear interpolation: 1 + 0.99 * 99
    assert stats["max"] == 100.0
    assert stats["nonfinite"] == 3
    assert np.isnan(study.error_stats([np.nan])["median"])


def test_pixel_errors_and_ks_distance():
    samples = np.array([[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]],  # a constant image: deviation 0
                        [[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (2, 2, 2, 2), mean 0.25
    errors = analysis.pixel_errors(samples)
    assert errors["abs_x"].shape == errors["dev_const"].shape == (2, 8)
    assert np.all(errors["dev_const"][0] == 0) and errors["abs_x"][0].max() == 1.0
    assert errors["dev_const"][1].max() == pytest.approx(1.75)
    assert errors["dev_const"][1].min() == pytest.approx(0.25)
    # Evenly spread points sit 1/(2n) from the uniform CDF; a point mass at 0 is 1/2 away.
    n = 50
    assert analysis.ks_uniform((np.arange(n) + 0.5) / n * 2 - 1, -1, 1) == pytest.approx(0.5 / n)
    assert analysis.ks_uniform(np.zeros(10), -1, 1) == pytest.approx(0.5)


def test_seed_spread_and_checkpoint_steps():
    assert study.seed_spread([3.0, 1.0, 2.0, np.nan]) == (2.0, 1.0, 3.0)
    assert study.checkpoint_steps(2000, 5) == [400, 800, 1200, 1600, 2000]
    assert study.checkpoint_steps(20, 2) == [10, 20]


def test_the_fixed_noise_set_is_identical_for_every_call():
    torch.manual_seed(0)
    model = build_model("ToyDiT-XS/1", norm="layernorm").eval()
    for p in model.final_layer.parameters():  # leave adaLN-Zero's zero output, so the model matters
        torch.nn.init.normal_(p, std=0.1)
    first = study.fixed_noise_samples(model, 16, 10, sample_seed=3)
    torch.randn(1000)  # the global RNG must play no part
    second = study.fixed_noise_samples(model, 16, 10, sample_seed=3)
    assert first.shape == (16, 2, 2, 2) and first.dtype == np.float64
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, study.fixed_noise_samples(model, 16, 10, sample_seed=4))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_study_end_to_end(tmp_path):
    runs, res = tmp_path / "runs", tmp_path / "res"
    argv = ["--preset", "tiny", "--results-dir", str(runs), "--res-dir", str(res)]
    study.main(argv)
    for name in ("study_errors.csv", "study_errors.md", "study_error_vs_step.png", "study_outlier_ratio.png",
                 "study_prediction.md"):
        assert (res / name).stat().st_size > 0, name
    rows = read_csv(res / "study_errors.csv")
    # 2 norms x 2 seeds x 2 checkpoints, times 3 measures: zeros abs_x and dev_const, constant dev_const.
    assert len(rows) == 2 * 2 * 2 * 3
    combos = {(r["data"], r["measure"]) for r in rows}
    assert combos == {("zeros", "abs_x"), ("zeros", "dev_const"), ("constant", "dev_const")}
    assert {(r["norm"], r["seed"], r["step"]) for r in rows} == {
        (n, s, t) for n in ("layernorm", "none") for s in ("0", "1") for t in ("10", "20")}
    assert all(r["ks_c"] != "nan" for r in rows if r["data"] == "constant")
    assert all(float(r["max"]) >= float(r["p99"]) >= float(r["median"]) > 0 for r in rows)
    table = (res / "study_errors.md").read_text()
    assert "| constant | abs(x - mean x) | none | 2 |" in table and "## Outlier ratio" in table
    outcome = (res / "study_prediction.md").read_text()
    assert "pending" not in outcome and "- P3 not testable" in outcome and "- P1 " in outcome
    assert list(runs.rglob("log.txt"))
    # A second call reuses the finished runs (no new run folder) and reproduces the numbers exactly.
    folders = sorted(p.name for p in runs.glob("*/*"))
    study.main(argv)
    assert sorted(p.name for p in runs.glob("*/*")) == folders
    assert read_csv(res / "study_errors.csv") == rows

    # --weights raw samples the training weights of the same checkpoints (reused, nothing trained).
    raw = tmp_path / "raw"
    study.main([*argv[:-1], str(raw), "--weights", "raw"])
    assert sorted(p.name for p in runs.glob("*/*")) == folders
    raw_md = (raw / "study_errors.md").read_text()
    assert "Each checkpoint's raw (training) model draws" in raw_md
    assert "## Outlier ratio of the final models (raw training weights)" in raw_md and "(raw" not in table
    _, args = study.parse_args(argv)
    (path,) = runs.glob("zeros-layernorm-seed1/*/checkpoints/0000020.pt")
    model, _ = load_model(path, use_ema=False)
    samples = study.fixed_noise_samples(model, args.num_samples, args.sampling_steps, args.sample_seed)
    key = ("zeros", "layernorm", "1", "20")
    for weights, table in (("raw", read_csv(raw / "study_errors.csv")), ("ema", rows)):
        got = {r["measure"]: float(r["median"]) for r in table
               if (r["data"], r["norm"], r["seed"], r["step"]) == key}
        expected = {r["measure"]: r["median"] for r in study.checkpoint_rows(samples, *key[:2], 1, 20)}
        if weights == "raw":
            assert got == pytest.approx(expected, rel=1e-6)
        else:
            assert all(got[m] != pytest.approx(expected[m], rel=1e-3) for m in expected)


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_dyt_check_replays_the_study_run(tmp_path, weights):
    argv = ["--preset", "tiny", "--norms", "dyt", "--data", "zeros", "--seeds", "1", "--dyt-check",
            "--weights", weights, "--results-dir", str(tmp_path / "runs"), "--res-dir", str(tmp_path / "res")]
    _, args = study.parse_args(argv)
    result = study.measure_run(args, "zeros", "dyt", 0)
    replay = study.dyt_check_run(args, study.DYT_DEFAULT)  # train_toy.py's loop, replayed in process
    assert replay["median"] == pytest.approx(result["dyt"]["median"], rel=1e-6)
    assert replay["last_loss"] == pytest.approx(result["dyt"]["last_loss"], rel=1e-5)  # log rounds to 1e-6
    no_zero = study.dyt_check_run(args, study.DYT_SETTINGS[-1])
    assert not no_zero["adaln_zero"] and no_zero["median"] != replay["median"]


def test_prediction_outcome_on_hand_made_rows():
    medians = {("zeros", "layernorm"): 2.0, ("zeros", "none"): 1.0, ("zeros", "rmsnorm"): 2.0,
               ("zeros", "dyt"): 1.0, ("constant", "layernorm"): 8.0, ("constant", "none"): 2.0,
               ("constant", "rmsnorm"): 6.0, ("constant", "dyt"): 3.0}
    rows = [dict(data=d, measure="dev_const", norm=n, seed=s, step=10, median=m * (1 + 0.01 * s),
                 ks_c=0.05 if d == "constant" else np.nan) for (d, n), m in medians.items() for s in range(3)]
    rows += [dict(r, step=5, median=100.0) for r in rows]  # an earlier checkpoint must be ignored
    held = {name: ok for name, ok, _ in study.prediction_outcome(rows)}
    assert held == {"P1": True, "P2": True, "P3": True, "P4": True}
    rows = [dict(r, median=0.5) if (r["data"], r["norm"]) == ("constant", "dyt") else r for r in rows]
    held = {name: ok for name, ok, _ in study.prediction_outcome(rows)}
    assert held["P1"] is False and held["P3"] is True


@pytest.mark.parametrize("flags", [["--norms", "batchnorm"], ["--data", "images"], ["--seeds", "0"],
                                   ["--preset", "tiny", "--dyt-check"]])
def test_bad_flags_exit_with_a_message(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main([*flags, "--results-dir", str(tmp_path), "--res-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_repeated_entries_are_one_variant():
    # --norms layernorm,layernorm reported 4 seeds where there were 2, every row twice, and with --jobs 2
    # two jobs trained into one run folder at once.
    _, args = study.parse_args(["--preset", "tiny", "--norms", "layernorm,none,layernorm", "--data",
                                "zeros,zeros", "--jobs", "2"])
    assert args.norms == ["layernorm", "none"] and args.data == ["zeros"]


@pytest.mark.parametrize("flags, message", [
    (["--sampling-steps", "2000"], "--sampling-steps 2000: 2000 sampling steps do not fit a 1000-step"),
    (["--outlier-timestep", "1000"], "--outlier-timestep 1000: 1000 is no timestep of a 1000-step diffusion"),
    (["--outlier-timestep", "-1"], "pass 0 to 999"),
    (["--lr", "inf"], "argument --lr: 'inf' is not a finite number > 0"),  # was train_toy.py's, after a file
    (["--ema-decay", "2"], "argument --ema-decay: '2' is not a number in [0, 1]"),
    (["--sample-seed", str(2**64)], "is not a seed in [0, 2^63)"),
    (["--jobs", "0"], "argument --jobs: '0' is not a positive integer"),
    (["--device", "tpu"], "argument --device: 'tpu' is not a device"),
    (["--results-dir", "{tmp}/afile"], "--results-dir"),
    (["--res-dir", "{tmp}/afile/res"], "afile is a file, not a folder"),
    (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),  # was a usage block first
])
def test_every_value_is_checked_before_any_run(flags, message, tmp_path, capsys, monkeypatch):
    def must_not_run(args):
        raise AssertionError("a run started")

    monkeypatch.setattr(study, "run_all", must_not_run)
    (tmp_path / "afile").write_text("a file, not a folder\n")
    argv = ["--preset", "tiny", "--results-dir", str(tmp_path / "runs"), "--res-dir", str(tmp_path / "res"),
            *(flag.replace("{tmp}", str(tmp_path)) for flag in flags)]
    with pytest.raises(SystemExit) as exit_info:
        study.main(argv)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and line.startswith("study.py: error: ") and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


def test_a_half_made_run_folder_is_replaced(tmp_path):
    """A start that failed before config.json (the code before this change made its folder first) made
    every later study in that results dir crash with FileNotFoundError."""
    runs = tmp_path / "runs"
    half_made = runs / "zeros-layernorm-seed0" / "000-ToyDiT-XS-1-layernorm"
    (half_made / "checkpoints").mkdir(parents=True)
    (half_made / "log.txt").write_text("")
    study.main(["--preset", "tiny", "--norms", "layernorm", "--data", "zeros", "--seeds", "1",
                "--num-samples", "8", "--results-dir", str(runs), "--res-dir", str(tmp_path / "res")])
    (run,) = (runs / "zeros-layernorm-seed0").iterdir()
    assert (run / "config.json").is_file() and sorted(analysis.run_checkpoints(run)) == [10, 20]
    assert len(read_csv(tmp_path / "res" / "study_errors.csv")) == 2 * 2  # 2 checkpoints x 2 measures
