"""The study's interventions (weight decay, dropout, the cap on each block's output): each reaches the model
or the optimizer, is kept in the checkpoint, survives a resume bit for bit, and is refused by one line when
its value makes no sense."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import perturb_zero_init, tensors_of

from ditnorm.checkpoint import load_model, read_checkpoint
from ditnorm.presets import INTERVENTIONS, RECIPES, runs
from ditnorm.trainer import train_run
from models import DiT, build_model, cap_to_rms

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="ToyDiT-XS/1", norm="layernorm", global_batch_size=16, lr=1e-2, ema_decay=0.9,
            log_every=5, seed=3, ckpt_steps="10")
ALL_THREE = dict(weight_decay=1.0, dropout=0.3, cap=2.0)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps with all three interventions on."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train_run(dict(TINY, max_steps=20, **ALL_THREE), run_dir)
    return run_dir


def test_the_flags_reach_the_model_and_the_optimizer(straight):
    ckpt = read_checkpoint(straight / "checkpoints" / "0000020.pt")
    assert (ckpt["config"]["dropout"], ckpt["config"]["cap"]) == (0.3, 2.0)
    assert all(group["weight_decay"] == 1.0 for group in ckpt["opt"]["param_groups"])
    assert ckpt["train_args"]["weight_decay"] == 1.0
    model, config = load_model(straight / "checkpoints" / "0000020.pt")
    assert (config["dropout"], config["cap"]) == (0.3, 2.0)
    block = model.blocks[0]
    assert block.cap == 2.0 and block.attn.attn_drop.p == block.attn.proj_drop.p == 0.3
    assert block.mlp.drop1.p == block.mlp.drop2.p == 0.3
    log = (straight / "log.txt").read_text()
    assert "dropout or an activation cap" in log  # the fused path says why it does not run


def test_resume_with_every_intervention_is_bit_identical(straight, tmp_path):
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    train_run(dict(TINY, max_steps=10, **ALL_THREE), run_dir)
    train_run(dict(TINY, max_steps=20, **ALL_THREE), run_dir)
    resumed, reference = tensors_of(run_dir / "checkpoints" / "0000020.pt"), tensors_of(
        straight / "checkpoints" / "0000020.pt")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_weight_decay_shrinks_the_weights(tmp_path):
    torch.set_num_threads(1)
    norms = {}
    for decay in (0.0, 5.0):
        run_dir = tmp_path / f"wd{decay}"
        train_run(dict(TINY, max_steps=10, weight_decay=decay), run_dir)
        weights = read_checkpoint(run_dir / "checkpoints" / "0000010.pt")["model"]
        norms[decay] = weights["blocks.0.attn.qkv.weight"].norm().item()
    # 10 steps of lr 1e-2 x decay 5: a factor 0.95 on top of the same Adam steps
    assert norms[5.0] < 0.97 * norms[0.0]


def rms(h):
    return h.pow(2).mean(-1, keepdim=True).sqrt()


def test_the_cap_bounds_every_block_output():
    model = perturb_zero_init(build_model("MnistDiT-XS/4", cap=3.0), std=0.5).eval()
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: outputs.append(o))
    x, t, y = torch.randn(4, 1, 28, 28) * 5, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        model(x, t, y)
    for h in outputs:  # after the clamp, against the clamped token's own RMS
        assert (h.abs() <= 3.0 * rms(h) * (1 + 1e-5)).all()
    assert any((h.abs() >= 3.0 * rms(h) * (1 - 1e-5)).any() for h in outputs)  # and it did clamp


def test_the_cap_clamps_as_little_as_it_can():
    x = torch.tensor([10.0, 1.0, -1.0, 0, 0, 0, 0, 0])  # b = 2 sqrt(2 / (8 - 4)): 10 -> sqrt(2)
    assert torch.allclose(cap_to_rms(x, 2.0), torch.tensor([2**0.5, 1.0, -1.0, 0, 0, 0, 0, 0]))
    gaussian = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
    capped = cap_to_rms(gaussian, 4.0)
    assert (capped.abs() <= 4.0 * rms(capped) * (1 + 1e-5)).all()
    assert (capped == gaussian).all(-1).float().mean() > 0.99  # a Gaussian token is rarely touched
    one = torch.cat([torch.tensor([100.0]), gaussian[0, 1:]])  # one huge channel: cut to ~4.6 sigma
    assert 3.0 < cap_to_rms(one, 4.0)[0] < 6.0
    four = torch.cat([torch.full((4,), 100.0), gaussian[0, 4:]])  # 64 / 4^2 = 4 equal channels escape it
    assert torch.equal(cap_to_rms(four, 4.0), four)


def test_dropout_is_random_in_training_only():
    model = perturb_zero_init(build_model("MnistDiT-XS/4", dropout=0.3), std=0.5)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.equal(model.train()(x, t, y), model(x, t, y))
        assert torch.equal(model.eval()(x, t, y), model(x, t, y))


def test_official_defaults_are_unchanged():
    model = DiT(input_size=8, in_channels=4, depth=1, hidden_size=32, num_heads=2, num_classes=3)
    assert (model.config["dropout"], model.config["cap"]) == (0.0, 0.0)
    assert model.blocks[0].attn.attn_drop.p == 0.0 and not model.blocks[0].cap
    with pytest.raises(ValueError, match="cap"):
        DiT(cap=0.5)
    with pytest.raises(ValueError, match="dropout"):
        DiT(dropout=1.0)


def test_the_interventions_preset_is_a_grid_axis():
    grid = runs("interventions")
    assert len(grid) == len(INTERVENTIONS) * 2 * 3
    base = RECIPES["mnist"]
    for name, cfg in grid:
        intervention = name.split("-")[-2]
        changed = {k for k in base if cfg[k] != base[k]}
        assert changed == {k for k, v in INTERVENTIONS[intervention].items() if v != base[k]}, name
        assert cfg["model"] == "MnistDiT-XS/4" and cfg["norm"] in ("layernorm", "none")
    # every intervention's seed-0 pair comes before any seed-1 run (a stopped study leaves matched pairs)
    seeds = [cfg["seed"] for _, cfg in grid]
    assert seeds == sorted(seeds)


@pytest.mark.parametrize("flag, value, words", [("--cap", "0.5", "0 (off) or a cap >= 1"),
                                                ("--dropout", "1", "a dropout probability in [0, 1)"),
                                                ("--weight-decay", "-1", "a finite number >= 0")])
def test_bad_values_are_one_line(tmp_path, flag, value, words):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), flag, value, "--results-dir",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith(words) and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
