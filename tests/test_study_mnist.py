"""ditnorm/studies/mnist.py: tables and exact tests from per-run measures, n said everywhere."""

import json

import numpy as np
import pytest

from ditnorm import layout, tables
from ditnorm.mnist_study import write_rows
from ditnorm.studies import mnist
from models import MNIST_MODELS


def fake_run(root, norm, seed, nll, ratio, name=None):
    rows = [{"step": 10, "weights": w, "group": "nll", "quantity": "nll_bpd", "value": nll, "n": 5}
            for w in ("raw", "ema")]
    for b, r in enumerate((2.0, ratio, 3.0)):  # the middle block carries the ratio
        rows += [{"step": 10, "weights": "raw", "group": "probe", "quantity": f"block{b}_{k}", "value": v,
                  "n": 5} for k, v in (("ratio", r), ("lead_share", 0.5), ("top1", r), ("var_top1", 0.1),
                                       ("massive", 0.0))]
    write_rows(root / "runs" / (name or f"MnistDiT-XS-4-{norm}-seed{seed}") / "measures.csv", rows)


def test_the_report_gives_seed_spreads_and_exact_tests(tmp_path):
    for seed in range(3):
        fake_run(tmp_path, "layernorm", seed, nll=1.5 + seed / 10, ratio=20.0 + seed)
        fake_run(tmp_path, "none", seed, nll=1.2 + seed / 10, ratio=5.0 + seed)
    fake_run(tmp_path, "dyt", 0, nll=1.0, ratio=4.0)
    text = mnist.report(tmp_path)
    assert "MnistDiT-XS-4 layernorm: 3, MnistDiT-XS-4 none: 3, MnistDiT-XS-4 dyt: 1" in text
    nll_line = next(line for line in text.splitlines() if line.startswith("| NLL"))
    assert "1.600 [1.500, 1.700] (n=3)" in nll_line and "1.000 (n=1)" in nll_line
    assert "9/9, p = 0.05" in nll_line  # complete separation, 3 against 3
    ratio_line = next(line for line in text.splitlines() if line.startswith("| largest middle-block")
                      and "raw" in line)
    assert "21.0 [20.0, 22.0] (n=3)" in ratio_line and "9/9, p = 0.05" in ratio_line
    assert (tmp_path / "curves.png").is_file()
    assert "| MnistDiT-XS-4 | layernorm | 1 | 21.0 |" in text
    assert "| MnistDiT-XS-4 | layernorm | 10 | 1.600 [1.500, 1.700] (n=3) | 21.0 [20.0, 22.0] (n=3) |" in text


def test_each_size_gets_holm_beside_its_p_and_the_sizes_pool_in_a_stratified_test(tmp_path):
    for seed in range(3):
        for size, shift in (("XS", 0.0), ("S", 100.0)):  # S's none above XS's layernorm: only within a size
            for norm, ratio in (("layernorm", 20.0), ("none", 5.0)):
                fake_run(tmp_path, norm, seed, nll=2.0 + seed / 10, ratio=ratio + shift + seed,
                         name=f"MnistDiT-{size}-4-{norm}-seed{seed}")
    text = mnist.report(tmp_path)
    ratio_lines = [line for line in text.splitlines() if line.startswith("| largest middle-block")
                   and "raw" in line]
    # per size: 9/9, p = 0.05, and Holm over the lines that have a test (NLL, ratio, lead share): x3
    assert ratio_lines[0].endswith("| 9/9, p = 0.05 | 0.15 |"), ratio_lines[0]
    assert "**The sizes pooled** (MnistDiT-S-4, MnistDiT-XS-4)" in text
    assert ratio_lines[2].startswith("| largest middle-block top-1/median, raw | 121.0 [120.0, 122.0] (n=3) "
                                     "| 106.0 [105.0, 107.0] (n=3) | 21.0 [20.0, 22.0] (n=3) |")
    assert ratio_lines[2].endswith("| 18 of 18 | 0.0025 (0.0025) | 0.0075 |"), ratio_lines[2]
    nll_line = [line for line in text.splitlines() if line.startswith("| NLL")][-1]
    assert "| 9 of 18 |" in nll_line  # equal values: every pair a tie


def test_the_ablation_rows_beside_the_probe_rows_do_not_break_the_report(tmp_path):
    # The ablation group stores the index of the block it zeroed as the quantity "block" (no "_").
    for norm in ("layernorm", "none"):
        fake_run(tmp_path, norm, 0, nll=1.0, ratio=5.0)
        path = tmp_path / "runs" / f"MnistDiT-XS-4-{norm}-seed0" / "measures.csv"
        rows = mnist.read_rows(path) + [
            {"step": 10, "weights": "raw", "group": "ablation", "quantity": q, "value": v, "n": 5}
            for q, v in (("block", 1.0), ("top_rise", 0.2), ("random_rise", 0.1))]
        write_rows(path, rows)
    text = mnist.report(tmp_path)
    ratio_line = next(line for line in text.splitlines() if line.startswith("| largest middle-block")
                      and "raw" in line)
    assert "5.0 (n=1)" in ratio_line


def test_the_outcome_of_the_predictions_per_size_on_hand_made_runs(tmp_path):
    for seed in range(3):
        fake_run(tmp_path, "layernorm", seed, nll=2.0, ratio=20.0 + seed)
        fake_run(tmp_path, "none", seed, nll=2.0 + seed / 100, ratio=19.0 + 2 * seed)  # 19, 21, 23: overlaps
    lines = mnist.prediction_outcome(mnist.load_runs(tmp_path)).splitlines()
    p1 = next(line for line in lines if line.startswith("- **P1**"))
    assert "MnistDiT-XS-4: fails" in p1 and "4.5/9 pairs, p = 0.60" in p1  # the tie counts 1/2
    assert p1.endswith("; not yet measured at MnistDiT-S-4.")
    p2 = next(line for line in lines if line.startswith("- **P2**"))
    assert p2.endswith("holds (6 runs, raw and EMA, last checkpoint; largest middle-block top-1/median "
                       "23.0).")
    assert "MnistDiT-XS-4: holds (EMA seed medians 2.000 and 2.010, none +0.5%)" in next(
        line for line in lines if line.startswith("- **P7**"))
    assert any(line.startswith("- **P5** (larger at S than at XS): not settled") for line in lines)
    # a massive block in one run makes P2 fail, naming the run
    path = tmp_path / "runs" / "MnistDiT-XS-4-none-seed1" / "measures.csv"
    rows = mnist.read_rows(path)
    for row in rows:
        if row["quantity"] == "block1_massive":
            row["value"] = 1.0
    write_rows(path, rows)
    text = mnist.prediction_outcome(mnist.load_runs(tmp_path))
    assert "- **P2** no massive activation (top-1 > 100 and >= 1000x the median) in any block: fails: " \
           "[('MnistDiT-XS-4', 'none', 1)]" in text


def test_the_figure_pair_is_the_largest_finished_one(tmp_path):
    def fake_folder(name, steps, max_steps=10):
        folder = tmp_path / name / "checkpoints"
        folder.mkdir(parents=True)
        for step in steps:
            (folder / f"{step:07d}.pt").write_bytes(b"")
        (tmp_path / name / "config.json").write_text(json.dumps({"train_args": {"max_steps": max_steps}}))

    for norm in ("layernorm", "none"):
        fake_folder(f"MnistDiT-S-4-{norm}-seed0", (2, 4))  # training: 4 of 10 steps
    pair, name = layout.last_pair(tmp_path, MNIST_MODELS)
    assert name == "MnistDiT-S/4" and pair["none"].name == "0000004.pt"  # nothing finished: the largest
    fake_folder("MnistDiT-XS-4-layernorm-seed0", (5, 10))
    fake_folder("MnistDiT-XS-4-none-seed0", (5, 10))
    pair, name = layout.last_pair(tmp_path, MNIST_MODELS)
    assert name == "MnistDiT-XS/4" and pair["layernorm"].name == "0000010.pt"
    with pytest.raises(FileNotFoundError, match="train them with python experiment.py train --preset mnist"):
        layout.last_pair(tmp_path, MNIST_MODELS, seed=1)


def test_one_seed_a_side_settles_no_test(tmp_path):
    fake_run(tmp_path, "layernorm", 0, nll=2.0, ratio=30.0)
    fake_run(tmp_path, "none", 0, nll=2.0, ratio=10.0)
    text = mnist.prediction_outcome(mnist.load_runs(tmp_path))
    p1 = next(line for line in text.splitlines() if line.startswith("- **P1**"))
    assert "MnistDiT-XS-4: not settled (n = 1 and 1 seeds, no test)" in p1


def test_two_seeds_a_side_cannot_settle_a_test_at_p_005(tmp_path):
    for seed in range(2):
        fake_run(tmp_path, "layernorm", seed, nll=2.0, ratio=30.0 + seed)
        fake_run(tmp_path, "none", seed, nll=2.0, ratio=10.0 + seed)
    text = mnist.prediction_outcome(mnist.load_runs(tmp_path))
    p1 = next(line for line in text.splitlines() if line.startswith("- **P1**"))
    assert "MnistDiT-XS-4: not settled (seed medians 30.5 vs 10.5, 4/4 pairs, p = 0.17, n = 2 vs 2; the " \
           "smallest p 2 vs 2 seeds allow is 0.17)" in p1


def test_runs_of_a_grid_carry_its_keys_and_a_table_groups_them_by_intervention(tmp_path):
    """How an intervention axis reads: a grid key of the runs' cfgs, a line key of a declared table, the
    layernorm and none seeds tested within each intervention."""
    grid = {}
    for intervention, shift in (("dropout", 0.0), ("cap", 1.0)):
        for seed in range(3):
            for norm, nll in (("layernorm", 2.0), ("none", 1.0)):
                name = f"MnistDiT-XS-4-{norm}-{intervention}-seed{seed}"
                grid[name] = dict(model="MnistDiT-XS/4", norm=norm, seed=seed, intervention=intervention)
                fake_run(tmp_path, norm, seed, nll=nll + shift + seed / 10, ratio=3.0, name=name)
    runs = mnist.load_runs(tmp_path, grid)
    assert len(runs) == 12 and {r["intervention"] for r in runs} == {"dropout", "cap"}
    rows = [dict(r, value=mnist.value(r, 10, "ema", "nll_bpd")) for r in runs]
    lines = tables.render(tables.Table(lines=("intervention",), fmt=".2f", holm=True), rows)
    assert lines[2] == ("| cap | 3.10 [3.00, 3.20] (n=3) | 2.10 [2.00, 2.20] (n=3) | 1.48 | 9 of 9 "
                        "| 0.050 (0.050) | 0.100 |")
    assert lines[3].startswith("| dropout | 2.10 [2.00, 2.20] (n=3) | 1.10 [1.00, 1.20] (n=3) |")


def test_the_interventions_report_reads_out_each_condition_against_baseline(tmp_path):
    from ditnorm.presets import runs

    grid = runs("interventions")
    rows_of = {}
    for name, cfg in grid:
        intervention = name.split("-")[-2]
        if intervention not in ("baseline", "wd1"):
            continue
        # LayerNorm pays 0.3 bits/dim under wd1
        shift = 0.3 if intervention == "wd1" and cfg["norm"] == "layernorm" else 0.0
        nll = 2.0 + shift + 0.01 * cfg["seed"] + (0.05 if cfg["norm"] == "layernorm" else 0.0)
        nll2 = dict(step=10_000, weights="ema", group="nll2", n=500)
        rows = [dict(nll2, quantity="nll2_clipped_nll_bpd", value=nll),
                dict(nll2, quantity="nll2_clipped_nll_se", value=0.02)]
        rows += [dict(step=10_000, weights="raw", group="outliers", quantity=f"outliers_block{b}_ratio_p50",
                      value=10.0 + b + (20 if cfg["norm"] == "layernorm" else 0), n=2000) for b in range(4)]
        rows_of[name] = rows
        write_rows(tmp_path / "runs" / name / "measures.csv", rows)
    text = mnist.interventions_report({}, tmp_path, dict(runs=grid))
    assert "baseline layernorm: 3, baseline none: 3, wd1 layernorm: 3, wd1 none: 3" in text
    main, readout = text.split("## The read-out")
    line = next(r for r in main.splitlines() if r.startswith("| NLL, bits/dim, x_0 clipped (EMA) | wd1 |"))
    assert "9 of 9" in line and "0.050 (0.050)" in line  # LayerNorm above none in every pair
    middle = next(r for r in main.splitlines() if r.startswith("| middle-block top-1/median, per-input"))
    assert "32.0 [32.0, 32.0] (n=3)" in middle  # the larger of blocks 1 and 2, not of 0-3
    read = next(r for r in readout.splitlines() if r.startswith("| NLL, bits/dim, x_0 clipped (EMA) | wd1 |"))
    assert "0.35 [0.35, 0.35] (n=3)" in read and "9/9, p = 0.05" in read  # the difference grew by 0.3
    assert "(EMA) | baseline |" not in readout  # baseline is the reference, not a condition
    assert (tmp_path / "results.md").read_text() == text


def test_the_nll_difference_is_paired_over_the_images_so_their_spread_cancels(tmp_path):
    from ditnorm.presets import runs

    grid = [(n, c) for n, c in runs("interventions") if n.split("-")[-2] in ("baseline", "wd1") and
            c["seed"] < 2]
    images = np.random.default_rng(0).normal(2.0, 0.4, 500)  # every image's own difficulty, shared
    noise = np.random.default_rng(1)
    for name, cfg in grid:
        shift = (0.05 if cfg["norm"] == "layernorm" else 0.0) + (0.3 if "wd1" in name and
                                                                    cfg["norm"] == "layernorm" else 0.0)
        own = images + shift + noise.normal(0, 0.01, 500)
        nll2 = dict(step=10_000, weights="ema", group="nll2", n=500)
        rows = [dict(nll2, quantity="nll2_clipped_nll_bpd", value=own.mean()),
                dict(nll2, quantity="nll2_clipped_nll_se", value=own.std(ddof=1) / np.sqrt(500))]
        rows += [dict(nll2, quantity=f"nll2_clipped_image{i}", value=v, n=1) for i, v in enumerate(own)]
        write_rows(tmp_path / "runs" / name / "measures.csv", rows)
    loaded = mnist.load_runs(tmp_path, dict(grid))
    for r in loaded:
        r["intervention"] = r["run"].split("-")[-2]
    out = {(r["intervention"], r["seed"]): r for r in mnist.paired_nll(loaded)}
    assert set(out) == {("baseline", 0), ("baseline", 1), ("wd1", 0), ("wd1", 1)}
    base, wd1 = out["baseline", 0], out["wd1", 0]
    # each model's standard error is the images' spread (0.4 / sqrt(500)); the paired one is the 0.01
    # noise's alone: sqrt(2) 0.01 / sqrt(500)
    assert abs(base["model_se"] - 0.018) < 0.003 and abs(base["se"] - 0.000632) < 0.0001
    assert abs(base["diff"] - 0.05) < 4 * base["se"] and base["against_baseline"] is None
    assert abs(wd1["against_baseline"] - 0.3) < 4 * wd1["against_se"] and wd1["against_se"] < 0.002
    text = mnist.interventions_report({}, tmp_path, dict(runs=grid))
    part = text.split("## The NLL difference of each seed pair")[1]
    assert "| wd1 | 0 | +0.3" in part and "| baseline | 1 | +0.0" in part
    assert (tmp_path / "intervention.png").stat().st_size > 0 and "](intervention.png)" in text


def test_the_interventions_report_and_its_figure_with_one_pair_and_with_none(tmp_path):
    from ditnorm.presets import runs

    grid = runs("interventions")
    text = mnist.interventions_report({}, tmp_path, dict(runs=grid))
    assert "runs measured (seeds): none yet" in text and "intervention.png" not in text
    assert not (tmp_path / "intervention.png").exists()
    for name, cfg in grid[:2]:  # the baseline seed-0 pair
        assert name.endswith("-baseline-seed0")
        fake_run(tmp_path, cfg["norm"], 0, nll=2.0, ratio=5.0, name=name)
    text = mnist.interventions_report({}, tmp_path, dict(runs=grid))
    assert "baseline layernorm: 1, baseline none: 1." in text
    assert (tmp_path / "intervention.png").stat().st_size > 0 and "](intervention.png)" in text


def test_the_committed_interventions_report_is_what_report_writes_from_its_rows(tmp_path):
    """res/interventions/: results.md and intervention.png from the committed runs/ alone (no checkpoints)."""
    import shutil

    import experiment
    from ditnorm.presets import PRESETS, runs

    committed = layout.ROOT / "res" / "interventions"
    record = tmp_path / "interventions"
    shutil.copytree(committed, record)
    (record / "intervention.png").unlink()
    experiment.report("interventions", PRESETS["interventions"], runs("interventions"), record,
                      tmp_path / "results")
    assert (record / "results.md").read_bytes() == (committed / "results.md").read_bytes()
    assert (record / "intervention.png").stat().st_size > 0
