"""ditnorm/image_metrics.py and mnist_study.py: each statistic on cases with known answers, and a tiny
model trained, measured incrementally and measured again after a kill."""

import math

import numpy as np
import pytest
import torch
from builders import levels, randomize, tiny_dit

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
           "reference": None, "choose_x": -torch.ones(10, 1, 28, 28), "choose_y": torch.arange(10)}
    calls, real = [], mnist_study._group_rows

    def fake_group(group, model, diffusion, sampler, ctx, **kwargs):
        calls.append(group)
        if group == "samples":  # (the classifier is tested in test_classifier.py)
            return [("fid", 1.0, 10), ("accuracy", 0.5, 10)]
        if group == "samples3":
            return [("samples3_fid_mean", 1.0, 3), ("samples3_fid_sd", 0.5, 3)]
        return real(group, model, diffusion, sampler, ctx, **kwargs)

    monkeypatch.setattr(mnist_study, "_group_rows", fake_group)
    kwargs = dict(final_step=6, sample_steps=5, per_class=1, num_inputs=20)
    assert mnist_study.measure_run(tiny_run, tmp_path, ctx, final_step=8) == []  # unfinished: nothing
    # raw 6: 3 + 3 new groups, ema 6: 5 + 4 new groups, raw 2: 2
    assert len(mnist_study.measure_run(tiny_run, tmp_path, ctx, **kwargs)) == 6 + 9 + 2
    rows = mnist_study.read_rows(tmp_path / "measures.csv")
    assert {(r["step"], r["weights"]) for r in rows} == {(6, "raw"), (6, "ema"), (2, "raw")}
    assert len(rows) == len({(r["step"], r["weights"], r["quantity"]) for r in rows})  # no duplicates
    names = {r["quantity"] for r in rows if r["group"] in ("nll2", "ablation2", "outliers")}
    assert all(q.startswith(("nll2_", "ablation2_", "outliers_")) for q in names)
    assert {"nll2_clipped_nll_se", "nll2_unclipped_nll_se", "ablation2_stats_top_rise",
            "outliers_input_ratio_p50", "outliers_block3_ratio_p90", "outliers_final_pooled_ratio"} <= names
    for kind in ("raw", "ema"):  # each held-out image's clipped bound, for the paired test; their mean
        got = {r["quantity"]: r["value"] for r in rows if r["weights"] == kind and r["group"] == "nll2"}
        per_image = [v for q, v in got.items() if q.startswith("nll2_clipped_image")]
        assert len(per_image) == len(ctx["x"]) and math.isclose(
            sum(per_image) / len(per_image), got["nll2_clipped_nll_bpd"], rel_tol=1e-6)
    calls.clear()
    assert mnist_study.measure_run(tiny_run, tmp_path, ctx, **kwargs) == [] and calls == []
    # A kill after some groups: the file keeps whole groups only; the next run measures what is missing.
    kept = [r for r in rows if not (r["step"] == 6 and r["weights"] == "ema" and r["group"] != "nll")]
    mnist_study.write_rows(tmp_path / "measures.csv", kept)
    assert len(mnist_study.measure_run(tiny_run, tmp_path, ctx, **kwargs)) == 8
    again = mnist_study.read_rows(tmp_path / "measures.csv")
    same = {(r["step"], r["weights"], r["quantity"]): r["value"] for r in again}
    assert same == {(r["step"], r["weights"], r["quantity"]): r["value"] for r in rows}


def test_the_fresh_draw_bound_averages_to_the_full_sum_within_its_standard_error(one_thread):
    diffusion = create_diffusion("", diffusion_steps=100)
    model = tiny_dit()
    x, y = levels(4).repeat(100, 1, 1, 1), torch.arange(4).repeat(100)  # 4 images, 100 copies each
    out = metrics.nll_fresh(model, diffusion, x, y, strata=8, exact=5, seed=1)
    # The full sum: every one of the 100 terms of each copy, each with fresh noise.
    g = torch.Generator().manual_seed(2)
    full = diffusion.calc_bpd_loop(model, x, model_kwargs={"y": y}, generator=g,
                                   clip_denoised=(True, False))["total_bpd"]  # (2, 400)
    tail = sum(diffusion.vb_terms_bpd(model, x, torch.full((400,), t), model_kwargs={"y": y}).mean().item()
               for t in range(6, 100))  # what the strata estimate
    for name, row in zip(("clipped", "unclipped"), full, strict=True):
        se = math.hypot(out[name]["nll_se"], row.std().item() / math.sqrt(len(row)))
        assert out[name]["n"] == 400 and abs(out[name]["nll_bpd"] - row.mean().item()) < 4 * se
        assert 4 * se < 0.1 * tail  # a wrong stratum weight would show
    assert out["clipped"]["nll_bpd"] < out["unclipped"]["nll_bpd"]
    # The standard error includes the timestep draws; one draw shared by every copy leaves them out.
    shared = metrics.nll(model, diffusion, x, y, strata=8, seed=3)
    assert shared["nll_se"] < out["unclipped"]["nll_se"]
    # The draws' part: all of the standard error where every input is one image; none of it for a model
    # that knows each image (every term is then the same for every draw), whose images still differ.
    one = metrics.nll_fresh(model, diffusion, x[:1].repeat(400, 1, 1, 1), y[:1].repeat(400), strata=8,
                            exact=5, seed=4)["unclipped"]
    assert abs(one["nll_draw_se"] / one["nll_se"] - 1) < 0.2
    known = metrics.nll_fresh(oracle(diffusion, x), diffusion, x, y, strata=8, exact=5)["unclipped"]
    assert known["nll_draw_se"] < 1e-6 < known["nll_se"]


def test_the_stream_is_probed_entering_block_0_after_each_block_and_entering_the_final_layer(one_thread):
    diffusion = create_diffusion("", diffusion_steps=100)
    model, x, y = tiny_dit(), levels(6), torch.arange(6)
    points = metrics.capture_points(model, diffusion, x, y, seed=4)
    assert list(points) == ["input", "block0", "block1", "final"]
    for block, h in enumerate(metrics.capture(model, diffusion, x, y, seed=4)):
        assert torch.equal(points[f"block{block}"], h)  # the probe group's streams, the same noise
    assert torch.equal(points["final"], points["block1"])  # the plain model feeds its last block onwards
    t = torch.full((6,), int(metrics.PROBE_FRACTIONS[0] * 100))
    x_t = diffusion.q_sample(x, t, noise=torch.randn(x.shape, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        entering = model.x_embedder(x_t) + model.pos_embed  # (N, T, D)
    assert torch.allclose(points["input"][:6], entering) and points["input"].shape == (4 * 6, 4, 64)


def test_outliers_per_input_are_quantiles_over_inputs_not_one_pooled_maximum():
    h = torch.ones(100, 9, 16)
    h[::10, 0, 0] = 50.0  # one input in ten holds a value 50x its median
    h[0, 0, 0] = 2000.0  # and one a massive activation (over 100 and 1000x its median)
    out = metrics.input_outliers(h)
    assert out["inputs"] == 100 and out["ratio_p50"] == 1.0 and out["median_p50"] == 1.0
    assert out["ratio_p90"] == pytest.approx(1 + 0.1 * 49) and out["ratio_max"] == 2000.0
    assert out["massive_share"] == 0.01
    assert metrics.stream_stats(h)["ratio"] == 2000.0  # the pooled maximum: one input decides it


def test_sample_draws_are_independent_and_pooled_and_the_real_floor_has_a_spread(one_thread):
    from ditnorm.classifier import DigitNet, embed, gaussian_fit

    torch.manual_seed(0)
    classifier = DigitNet(size=8).eval()
    sampler = create_diffusion("5", diffusion_steps=100)
    features = embed(classifier, levels(300, seed=5))[0]
    reference = gaussian_fit(features.numpy())
    scores, pooled = metrics.sample_draws(tiny_dit(), sampler, classifier, reference, 2, draws=3)
    assert [s["n"] for s in scores] == [20, 20, 20] and pooled["n"] == 60
    assert len({s["fid"] for s in scores}) == 3  # three different draws
    images, labels = metrics.samples(tiny_dit(), sampler, 2, seed=0)
    assert scores[0] == metrics.sample_scores(classifier, images, labels, reference)  # the samples group's
    mean, sd = metrics.real_floor(features, reference, 20, draws=6)
    larger, _ = metrics.real_floor(features, reference, 200, draws=6)
    assert sd > 0 and 0 < larger < mean  # a real subset scores above 0, less so the larger it is
