"""ditnorm/image_metrics.py and mnist_study.py: each statistic on cases with known answers, and a tiny
model trained, measured incrementally and measured again after a kill."""

import numpy as np
import pytest
import torch
from builders import randomize

from diffusion import create_diffusion
from ditnorm import image_metrics as metrics
from ditnorm import mnist_study
from ditnorm.images import to_pixels


def test_histogram_quantiles_are_fixed_quantiles():
    values = np.geomspace(1e-5, 1e-1, 100_001)
    counts = np.histogram(values, metrics.ERROR_EDGES)[0]
    for q in (0.5, 0.99, 0.999):
        assert np.isclose(metrics.histogram_quantile(counts, q), np.quantile(values, q), rtol=0.01)


def oracle(diffusion, x_start):
    """A model that knows x_0: the exact eps of x_t, and the posterior variance."""

    def model(x_t, t, y):
        c = diffusion.coefficients(t, x_t)
        eps = (x_t - c.sqrt_alphas_cumprod * x_start) / c.sqrt_one_minus_alphas_cumprod
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    return model


def test_precision_of_a_denoiser_that_knows_the_image_is_exact():
    diffusion = create_diffusion("")
    x = torch.full((4, 1, 4, 4), -1.0)
    x[:, :, 1:3, 1:3] = 2 * 200 / 255 - 1  # a foreground square on the level 200
    y = torch.zeros(4, dtype=torch.long)
    out = metrics.precision(oracle(diffusion, x), diffusion, x, y, timestep=0, num_inputs=8, batch=4)
    assert out["inputs"] == 8 and out["bg_pixels"] == 8 * 12
    assert out["bg_wrong_level"] == 0 and out["all_wrong_level"] == 0 and out["bg_p999"] < 1e-5
    # A denoiser that returns its input: at t = 0 the noise (std 0.01) moves pixels off their level.
    out = metrics.precision(lambda x_t, t, y: torch.cat([torch.zeros_like(x_t)] * 2, 1), diffusion, x, y,
                            timestep=0, num_inputs=400, batch=4)
    assert 0.2 < out["bg_wrong_level"] < 0.9 and 0.002 < out["bg_p50"] < 0.02
    levels = to_pixels(torch.tensor([-1.0, 1.0, 0.0, 2 * 17 / 255 - 1]))
    assert levels.tolist() == [0, 255, 128, 17]


def test_stream_statistics_find_a_planted_channel():
    h = torch.randn(50, 9, 16)
    h[..., 5] += 40.0  # channel 5 is large in every token
    stats = metrics.stream_stats(h)
    assert stats["lead_channel"] == 5 and stats["lead_share"] == 1.0 and stats["top_channels"][0] == 5
    assert stats["ratio"] > 40 and not stats["massive"] and stats["var_top1"] > 0.9
    assert metrics.recurring_channels(h, k=1) == [5]
    plain = metrics.stream_stats(torch.randn(50, 9, 16))
    assert plain["lead_share"] < 0.3 and plain["var_top1"] < 0.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """A tiny MNIST-shaped DiT trained 6 steps through the trainer, checkpoints at 2, 4 and 6."""
    from ditnorm.trainer import IMAGE_DEFAULTS, train_run

    run = tmp_path_factory.mktemp("mnist") / "tiny-layernorm-seed0"
    cfg = {**IMAGE_DEFAULTS, "model": "MnistDiT-XS/4", "max_steps": 6, "ckpt_every": 2, "log_every": 2,
           "global_batch_size": 8, "diffusion_steps": 100}
    train_run(cfg, run)
    return run


def test_the_ablation_of_a_planted_channel_costs_more_than_random_ones(tiny_run):
    from ditnorm.checkpoint import load_model

    model, _ = load_model(tiny_run / "checkpoints" / "0000006.pt", weights="raw", download=False)
    randomize(model, std=0.05)  # every branch reaches the output
    diffusion = create_diffusion("", diffusion_steps=100)
    x, y = -torch.ones(10, 1, 28, 28), torch.arange(10)
    with torch.no_grad():  # channel 3 of every token is large from the patch embedding on
        model.x_embedder.proj.bias[3] = 20.0
    out = metrics.ablation(model, diffusion, x, y, 1, [3], random_draws=3)
    assert out["top_rise"] != 0 and abs(out["top_rise"]) > abs(out["random_rise"])
    assert out["base"] == metrics.heldout_loss(model, diffusion, x, y)  # the hooks are gone afterwards


def test_a_run_is_measured_once_per_group_and_again_only_where_a_kill_left_a_gap(tiny_run, tmp_path,
                                                                                  monkeypatch):
    ctx = {"x": -torch.ones(20, 1, 28, 28), "y": torch.arange(20) % 10, "classifier": None,
           "reference": None}
    calls, real = [], mnist_study._group_rows

    def fake_group(group, model, diffusion, sampler, ctx, **kwargs):
        calls.append(group)
        if group == "samples":  # (the classifier is tested in test_classifier.py)
            return [("fid", 1.0, 10), ("accuracy", 0.5, 10)]
        return real(group, model, diffusion, sampler, ctx, **kwargs)

    monkeypatch.setattr(mnist_study, "_group_rows", fake_group)
    kwargs = dict(final_step=6, sample_steps=5, per_class=1, num_inputs=20)
    assert mnist_study.measure_run(tiny_run, tmp_path, ctx, final_step=8) == []  # unfinished: nothing
    assert len(mnist_study.measure_run(tiny_run, tmp_path, ctx, **kwargs)) == 3 + 5 + 2  # raw 6, ema 6, raw 2
    rows = mnist_study.read_rows(tmp_path / "measures.csv")
    assert {(r["step"], r["weights"]) for r in rows} == {(6, "raw"), (6, "ema"), (2, "raw")}
    assert len(rows) == len({(r["step"], r["weights"], r["quantity"]) for r in rows})  # no duplicates
    calls.clear()
    assert mnist_study.measure_run(tiny_run, tmp_path, ctx, **kwargs) == [] and calls == []
    # A kill after some groups: the file keeps whole groups only; the next run measures what is missing.
    kept = [r for r in rows if not (r["step"] == 6 and r["weights"] == "ema" and r["group"] != "nll")]
    mnist_study.write_rows(tmp_path / "measures.csv", kept)
    assert len(mnist_study.measure_run(tiny_run, tmp_path, ctx, **kwargs)) == 4
    again = mnist_study.read_rows(tmp_path / "measures.csv")
    same = {(r["step"], r["weights"], r["quantity"]): r["value"] for r in again}
    assert same == {(r["step"], r["weights"], r["quantity"]): r["value"] for r in rows}
