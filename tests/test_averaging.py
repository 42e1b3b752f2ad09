"""averaging.py: each average follows its formula, survives a checkpoint, and reads out as a state dict."""

import math

import pytest
import torch
from builders import randomize

from ditnorm import averaging
from models import build_model


def test_power_gamma_matches_edm2s_width():
    for sigma_rel in (0.05, 0.10, 0.2):
        g = averaging.power_gamma(sigma_rel)
        assert math.isclose(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5, sigma_rel, rel_tol=1e-9)
    assert math.isclose(averaging.power_gamma(0.05), 16.97, abs_tol=0.01)  # EDM2's table: 16.97 / 6.94
    assert math.isclose(averaging.power_gamma(0.10), 6.94, abs_tol=0.01)


def test_labels_are_checked():
    assert averaging.parse_label("power_0.10") == ("power", 0.10)
    for bad in ("ema", "ema_1.5", "mean_0.9", "sphere_x"):
        with pytest.raises(ValueError, match="unknown average"):
            averaging.parse_label(bad)


def test_updates_follow_the_formulas():
    model = randomize(build_model("ToyDiT-XS/1"))
    avg = averaging.WeightAverages(model, ["ema_0.9", "power_0.10", "sphere_0.5"])
    p = next(model.parameters())
    start = p.detach().clone()
    history = []
    for step in range(1, 4):
        with torch.no_grad():
            p.mul_(1.5).add_(0.01)  # a weight whose scale drifts
        history.append(p.detach().clone())
        avg.update(step)
    ema = start
    for w in history:
        ema = 0.9 * ema + 0.1 * w
    torch.testing.assert_close(avg.tensors["ema_0.9"][0], ema)
    # power EMA: beta_1 = 0 (the first step's weights), then (1 - 1/t)^(gamma + 1)
    g = averaging.power_gamma(0.10)
    power = history[0]
    for t, w in enumerate(history[1:], start=2):
        beta = (1 - 1 / t) ** (g + 1)
        power = beta * power + (1 - beta) * w
    torch.testing.assert_close(avg.tensors["power_0.10"][0], power)
    unit = start / start.norm()
    for w in history:
        unit = 0.5 * unit + 0.5 * w / w.norm()
    torch.testing.assert_close(avg.tensors["sphere_0.5"][0], unit)


def test_state_dict_round_trip_and_read_out():
    model = randomize(build_model("ToyDiT-XS/1"))
    avg = averaging.WeightAverages(model)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1)
        avg.update(step)
    saved = avg.state_dict()
    again = averaging.WeightAverages(randomize(build_model("ToyDiT-XS/1"), seed=9))
    again.load_state_dict(saved)
    for label in avg.labels:
        assert all(torch.equal(a, b) for a, b in zip(avg.tensors[label], again.tensors[label], strict=True))
    raw = model.state_dict()
    sphere = averaging.read_out(saved["sphere_0.9999"], raw)
    for name, value in sphere.items():  # the raw norms, the averaged directions
        torch.testing.assert_close(value.norm(), raw[name].norm())
    ema = averaging.read_out(saved["ema_0.999"], raw)
    key = "blocks.0.mlp.fc2.weight"
    assert set(ema) == set(raw) and not torch.equal(ema[key], raw[key])
    build_model("ToyDiT-XS/1").load_state_dict(sphere)  # a state dict the model loads
