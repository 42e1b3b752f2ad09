"""paper.py on the tiny preset: train, resume, measure incrementally, report with the predictions' outcome."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

import paper
from ditnorm.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--seeds", "0", "--jobs", "2"]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    runs, res = root / "runs", root / "res"
    res.mkdir()
    shutil.copy(ROOT / "res" / "paper" / "prediction.md", res / "prediction.md")
    flags = [*TINY, "--results-dir", str(runs), "--res-dir", str(res)]
    paper.main(["train", *flags])
    paper.main(["measure", *flags])
    paper.main(["report", *flags])
    return runs, res, flags


def test_every_checkpoint_is_measured_with_every_weights_kind(study):
    runs, res, _ = study
    errors = rows(res / "errors.csv")
    assert {(r["norm"], r["seed"], r["step"]) for r in errors} == {
        (n, "0", t) for n in ("layernorm", "none") for t in ("10", "20")}
    assert {r["weights"] for r in errors} == set(paper.WEIGHTS)
    assert {"median", "p99", "max"} <= set(errors[0])
    weights = rows(res / "weights.csv")
    tensors = {r["tensor"] for r in weights}
    assert {"writers", "all", "x_embedder", "block0.attn.proj", "block1.mlp.fc2", "block0.gates"} <= tensors
    raw_all = [r for r in weights if r["weights"] == "raw" and r["tensor"] == "all"]
    assert all(abs(float(r["cosine_to_raw"]) - 1) < 1e-9 for r in raw_all)
    assert {int(r["block"]) for r in rows(res / "rms.csv")} == {0, 1}
    for name in ("error_vs_step.png", "averages_at_last_step.png", "writer_norms.png", "results.md"):
        assert (res / name).stat().st_size > 0


def test_a_row_is_what_sampling_the_checkpoint_gives(study):
    runs, res, _ = study
    run = paper.run_folder(runs, "none", 0)
    model, _ = load_model(run / "checkpoints" / "0000020.pt", weights="power_0.05")
    generator = torch.Generator().manual_seed(0)
    samples = paper.sample_toy(model, paper.create_diffusion("10"), 20, generator=generator)
    want = paper.error_stats(samples.double().numpy())["median"]
    (row,) = [r for r in rows(res / "runs" / "none-seed0" / "errors.csv")
              if r["step"] == "20" and r["weights"] == "power_0.05"]
    assert float(row["median"]) == pytest.approx(want, rel=1e-12)


def test_measure_is_incremental_and_train_resumes(study, tmp_path):
    runs, res, flags = study
    before = (res / "runs" / "layernorm-seed0" / "errors.csv").read_text()
    paper.main(["measure", *flags])  # nothing new to measure
    assert (res / "runs" / "layernorm-seed0" / "errors.csv").read_text() == before
    partial = tmp_path / "partial"
    paper.main(["measure", *TINY, "--results-dir", str(runs), "--res-dir", str(partial), "--steps", "20"])
    assert {r["step"] for r in rows(partial / "runs" / "none-seed0" / "errors.csv")} == {"20"}
    assert paper.train_command(paper.parse_args(["train", *flags]), "none", 0) is None  # finished
    # An unfinished run resumes from its last checkpoint.
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    run = paper.run_folder(copy, "none", 0)
    (run / "checkpoints" / "0000020.pt").unlink()
    cmd = paper.train_command(paper.parse_args(["train", *TINY, "--results-dir", str(copy)]), "none", 0)
    assert cmd[cmd.index("--resume") + 1] == str(run)


def test_stats_only_measures_the_statistics_once_and_a_later_measure_adds_the_errors(study, tmp_path):
    runs, res, _ = study
    flags = [*TINY, "--results-dir", str(runs), "--res-dir", str(tmp_path)]
    paper.main(["measure", "--stats-only", *flags])
    mine, full = tmp_path / "runs" / "none-seed0", res / "runs" / "none-seed0"
    assert not (mine / "errors.csv").exists()
    assert rows(mine / "weights.csv") == rows(full / "weights.csv")
    assert rows(mine / "rms.csv") == rows(full / "rms.csv")
    paper.main(["measure", *flags])
    for name in ("errors", "weights", "rms"):  # each measured once, as a measure in one go gives
        assert rows(mine / f"{name}.csv") == rows(full / f"{name}.csv")


def test_perturb_steps_from_the_raw_weights_toward_the_average_and_at_random(study, tmp_path):
    runs, res, _ = study
    shutil.copytree(res / "runs", tmp_path / "runs")
    flags = [*TINY, "--results-dir", str(runs), "--res-dir", str(tmp_path)]
    paper.main(["perturb", *flags])
    perturbed = rows(tmp_path / "runs" / "none-seed0" / "perturb.csv")
    assert {(r["direction"], float(r["alpha"])) for r in perturbed} == {
        (d, a) for d in ("toward ema_0.999", "random") for a in paper.PERTURB_ALPHAS}
    # The full step toward the average is the average, up to float round-off.
    (full,) = [r for r in perturbed if r["direction"] == "toward ema_0.999" and r["alpha"] == "1.0"]
    (average,) = [r for r in rows(res / "runs" / "none-seed0" / "errors.csv")
                  if r["step"] == "20" and r["weights"] == "ema_0.999"]
    assert float(full["median"]) == pytest.approx(float(average["median"]), rel=1e-4)
    (random,) = [r for r in perturbed if r["direction"] == "random" and r["alpha"] == "1.0"]
    assert random["median"] != full["median"]
    paper.main(["perturb", *flags, "--steps", "10,20"])  # adds step 10, keeps step 20's rows
    both = rows(tmp_path / "runs" / "none-seed0" / "perturb.csv")
    assert [r for r in both if r["step"] == "20"] == perturbed and len(both) == 2 * len(perturbed)
    paper.main(["report", *flags])
    text = (tmp_path / "results.md").read_text()
    assert "| random | 0.5 |" in text and "| 10 | " in text


def test_report_appends_the_outcome_below_the_unchanged_predictions(study):
    _, res, _ = study
    written = (ROOT / "res" / "paper" / "prediction.md").read_text().split("## Outcome")[0]
    text = (res / "prediction.md").read_text()
    assert text.startswith(written)
    outcome = text.split("## Outcome")[1]
    assert "seeds: layernorm 1, none 1 (preliminary" in outcome
    for name in ("C1", "C2", "M1", "M2", "M3", "R1"):
        assert f"- {name} " in outcome
    assert "Ratio layernorm / none" in (res / "results.md").read_text() and "(seeds 1/1)" in outcome + (
        res / "results.md").read_text()
    info = json.loads((res / "runs" / "none-seed0" / "run.json").read_text())
    assert info["step_path"] == "tiled-cpu" and info["train_args"]["max_steps"] == 20


def test_bad_flags_are_one_line(capsys):
    for argv, message in ((["train", "--seeds", "a"], "--seeds must be comma-separated integers"),
                          (["report", "--jobs", "0"], "'0' is not a positive integer"),
                          (["fly"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_info:
            paper.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
