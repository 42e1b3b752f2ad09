"""benchmarks/gpu_mnist.py --tiny: the GPU command's whole pipeline (train side by side, measure, report) on
a CPU, and its runs are the trainer's."""

import pytest
import torch
from builders import load_benchmark

from ditnorm.analysis import run_checkpoints
from ditnorm.mnist_study import read_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    return load_benchmark("gpu_mnist")


def test_the_ladder_is_the_mnist_preset_at_four_sizes():
    runs = dict(load_script().ladder(("XS", "S", "B", "L"), load_script().NORM_SEEDS))
    assert len(runs) == 32 and runs["MnistDiT-L-4-dyt-seed0"]["max_steps"] == 10_000
    assert runs["MnistDiT-S-4-none-seed2"]["global_batch_size"] == 64


def test_the_interventions_ladder_is_the_preset_at_larger_sizes():
    script = load_script()
    runs = dict(script.ladder(("S", "B"), dict(layernorm=(0,), none=(0,)), preset="interventions"))
    assert len(runs) == 2 * 5 * 2
    cfg = runs["MnistDiT-B-4-layernorm-cap4-seed0"]
    assert cfg["model"] == "MnistDiT-B/4" and cfg["cap"] == 4.0 and cfg["max_steps"] == 10_000
    assert runs["MnistDiT-S-4-none-wd1-seed0"]["weight_decay"] == 1.0


def test_tiny_trains_measures_and_reports_on_the_cpu(tmp_path):
    load_script().main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    for name in ("MnistDiT-XS-4-layernorm-seed0", "MnistDiT-XS-4-none-seed0"):
        assert sorted(run_checkpoints(tmp_path / "train" / name)) == [2, 4]
        groups = {r["group"] for r in read_rows(tmp_path / "runs" / name / "measures.csv")}
        assert groups == {"nll", "probe", "precision", "samples", "ablation", "nll2", "samples3", "ablation2",
                          "outliers"}
    assert "MnistDiT-XS-4 layernorm: 1, MnistDiT-XS-4 none: 1" in (tmp_path / "results.md").read_text()
    ckpt = torch.load(tmp_path / "train" / "MnistDiT-XS-4-none-seed0" / "checkpoints" / "0000004.pt",
                      weights_only=True)
    assert ckpt["step"] == 4 and ckpt["train_args"]["norm"] == "none"
