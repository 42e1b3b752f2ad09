"""analysis.py: hooks, outlier statistics, toy helpers and plots, on tiny models and hand-built tensors."""

import math

import numpy as np
import pytest
import torch
from builders import make_toy_runs, perturb_zero_init

from diffusion import create_diffusion
from ditnorm import analysis, records
from ditnorm.checkpoint import CheckpointError
from models import build_model


def tiny_toy(norm="layernorm"):
    return perturb_zero_init(build_model("ToyDiT-XS/1", norm=norm)).eval()


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_gives_each_block_output_and_removes_hooks():
    model = tiny_toy()
    x, t, y = torch.randn(3, 2, 2, 2), torch.tensor([10, 500, 999]), torch.zeros(3, dtype=torch.long)
    seen = []
    handle = model.final_layer.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    outputs = analysis.capture_block_outputs(model, x, t, y)
    handle.remove()
    assert len(outputs) == model.config["depth"] == 2
    assert all(h.shape == (3, 4, 32) for h in outputs)  # (N, T, D): 2x2 pixels, patch 1 -> 4 tokens
    torch.testing.assert_close(outputs[-1], seen[0])  # the last one is what the final layer reads
    assert not torch.allclose(outputs[0], outputs[1])
    assert no_hooks_left(model)


def test_hooks_removed_when_forward_fails():
    model = tiny_toy()
    with pytest.raises(RuntimeError):
        analysis.capture_block_outputs(model, torch.randn(2, 3, 2, 2), torch.zeros(2), torch.zeros(2).long())
    assert no_hooks_left(model)


def test_outlier_stats_finds_planted_outlier():
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (2, 16, 64), generator=g) * 2 - 1
    clean = 0.1 * signs.float()  # (N, T, D): every |value| is 0.1
    planted = clean.clone()
    planted[1, 5, 7], planted[0, 2, 3], planted[1, 9, 60] = -500.0, 300.0, 200.0
    stats = analysis.outlier_stats([clean, planted])
    assert stats[0]["top1"] == pytest.approx(0.1) and not stats[0]["massive"]
    s = stats[1]
    assert (s["top1"], s["top2"], s["top3"]) == pytest.approx((500.0, 300.0, 200.0))
    assert s["median"] == pytest.approx(0.1) and s["ratio"] == pytest.approx(5000.0) and s["massive"]
    # large ratio but under 100 in magnitude: not massive
    small = clean.clone()
    small[0, 0, 0] = 90.0
    assert not analysis.outlier_stats([small])[0]["massive"]
    table = analysis.format_outlier_table(stats, title="t")
    assert "| 1 | 500 | 300 | 200 | 0.1 | 5000 | yes |" in table


def test_error_stats_and_pixel_pairs():
    s = np.zeros((3, 2, 2, 2))
    s[0, 0, 1, 1], s[0, 1, 1, 1], s[2, 1, 0, 0], s[1, 0, 0, 0] = 4.0, -2.0, np.nan, -8.0
    stats = analysis.error_stats(s)
    assert stats["nonfinite"] == 1 and stats["max"] == 8.0 and stats["median"] == 0.0
    assert stats["mean"] == pytest.approx(14.0 / 23)
    pairs = analysis.pixel_pairs(s)
    assert pairs.shape == (12, 2)
    assert pairs[3].tolist() == [4.0, -2.0]  # sample 0, pixel (1, 1): channel 0 against channel 1


def test_toy_scatter_shares_axes():
    rng = np.random.default_rng(0)
    fig = analysis.plot_toy_scatter({"a": 1e-4 * rng.standard_normal((100, 2, 2, 2)),
                                     "b": 1e-2 * rng.standard_normal((100, 2, 2, 2))})
    a, b = fig.axes[:2]
    assert a.get_xlim() == b.get_xlim() == a.get_ylim() == b.get_ylim()
    assert a.get_xscale() == "symlog" and b.get_yscale() == "symlog"
    assert len(a.collections[0].get_offsets()) == 400


def test_token_plot_has_a_panel_per_layer_and_token():
    outputs = [torch.randn(1, 16, 8) for _ in range(3)]
    tokens = analysis.pick_tokens(16, 4, seed=0)
    assert len(set(tokens)) == 4 and tokens == analysis.pick_tokens(16, 4, seed=0)
    fig = analysis.plot_token_embeddings(outputs, tokens, stats=analysis.outlier_stats(outputs))
    assert len(fig.axes) == 12


def test_runs_checkpoints_and_sampling(tmp_path):
    runs = make_toy_runs(tmp_path)
    assert list(analysis.run_checkpoints(runs["none"])) == [10, 20]
    assert analysis.checkpoint_at(runs["none"]).name == "0000020.pt"
    with pytest.raises(FileNotFoundError, match=r"\[10, 20\]"):
        analysis.checkpoint_at(runs["none"], 30)
    path = analysis.checkpoint_at(runs["layernorm"], 10)
    a, config = analysis.sample_checkpoint(path, 5, seed=3, num_sampling_steps=5)
    b, _ = analysis.sample_checkpoint(path, 5, seed=3, num_sampling_steps=5)
    assert a.shape == (5, 2, 2, 2) and config["norm"] == "layernorm"
    np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="norm=layernorm"):  # a checkpoint in the wrong slot
        analysis.sample_checkpoint(path, 1, num_sampling_steps=1, norm="none")
    assert [analysis.step_label(s) for s in (500, 2000, 2500, 10000)] == ["500", "2k", "2.5k", "10k"]


def test_noised_inputs_toy_data_is_zero():
    config = tiny_toy().config | {"model": "ToyDiT-XS/1"}
    x_t, t, y = analysis.noised_inputs(config, 999, 0, 4, generator=torch.Generator().manual_seed(0))
    assert x_t.shape == (4, 2, 2, 2) and t.tolist() == [999] * 4 and y.tolist() == [0] * 4
    # at t = 999 the linear schedule leaves sqrt(alpha_bar) ~ 0.006 of the (zero) data: x_t is the noise
    assert 0.5 < x_t.std().item() < 1.5 and math.isfinite(x_t.sum().item())
    with pytest.raises(ValueError, match="out of range"):
        analysis.noised_inputs(config, 10, 1)


def test_token_plot_rows_take_given_labels():
    outputs = [torch.randn(1, 4, 8)] * 2
    fig = analysis.plot_token_embeddings(outputs, [0, 1], layer_labels=["double 0", "single 0"])
    assert [fig.axes[i].get_ylabel() for i in (0, 2)] == ["block double 0", "block single 0"]


def test_find_run_pair_matches_configurations_and_names_both_otherwise(tmp_path):
    from builders import save_model

    runs = make_toy_runs(tmp_path / "a" / "nested")  # found below results_dir too
    assert analysis.find_run_pair(tmp_path, model="ToyDiT-XS/1") == (runs["layernorm"], runs["none"])
    # a newer no-norm run with another seed is skipped: the pair is the one trained alike
    other = tmp_path / "b" / "001-ToyDiT-XS-1-none"
    save_model(build_model("ToyDiT-XS/1", norm="none"), "ToyDiT-XS/1", other / "checkpoints" / "0000020.pt",
               train_args={"seed": 1, "log_every": 5})
    assert analysis.find_run_pair(tmp_path, model="ToyDiT-XS/1") == (runs["layernorm"], runs["none"])
    with pytest.raises(ValueError, match=r"trained differently \(train_args.seed|seed None vs 1"):
        analysis.find_run_pair(tmp_path, none_run=other, layernorm_run=runs["layernorm"])
    with pytest.raises(FileNotFoundError, match="no toy run for norm layernorm or none"):
        analysis.find_run_pair(tmp_path / "empty")
    assert analysis.paired_steps(runs.values()) == [10, 20]
    with pytest.raises(ValueError, match=r"they share \[10, 20\]"):
        analysis.paired_steps(runs.values(), [30])


def test_find_run_pair_finds_a_presets_toy_runs_and_passes_over_other_models(tmp_path):
    """make reproduce's folders (<data>-<norm>-seed<k>) are toy runs; an MNIST run (its config.json or,
    without one, its name says so) is not one, however new; with none under results_dir, the shipped folder
    is searched."""
    import json

    from builders import save_model

    reproduce = tmp_path / "results" / "reproduce"
    runs = {norm: reproduce / f"zeros-{norm}-seed0" for norm in ("layernorm", "none")}
    for norm, run in runs.items():
        save_model(build_model("ToyDiT-XS/1", norm=norm), "ToyDiT-XS/1", run / "checkpoints" / "0000020.pt")
    mnist = tmp_path / "results" / "mnist" / "MnistDiT-XS-4-layernorm-seed0"
    save_model(build_model("ToyDiT-XS/1", norm="layernorm"), "ToyDiT-XS/1",
               mnist / "checkpoints" / "0000030.pt")  # the newest: written last
    (mnist / "config.json").write_text(json.dumps({"model_config": {"model": "MnistDiT-XS/4",
                                                                     "norm": "layernorm"}}))
    shipped = tmp_path / "results" / "weights" / "MnistDiT-S-4-layernorm-seed0"  # no config.json: its name
    save_model(build_model("ToyDiT-XS/1", norm="layernorm"), "ToyDiT-XS/1",
               shipped / "checkpoints" / "0000030.pt")
    assert analysis.find_run_pair(tmp_path / "results") == (runs["layernorm"], runs["none"])
    (tmp_path / "empty").mkdir()
    assert analysis.find_run_pair(tmp_path / "empty", shipped=reproduce) == \
        (runs["layernorm"], runs["none"])
    with pytest.raises(FileNotFoundError, match="no toy run"):
        analysis.find_run_pair(tmp_path / "empty", shipped=tmp_path / "missing")


def test_scatter_title_is_wrapped_to_the_figure():
    fig = analysis.plot_toy_scatter({"a": np.full((2, 2, 2, 2), 1e-3)}, title="x" * 30 + " " + "y" * 200)
    assert len(fig._suptitle.get_text().splitlines()) >= 3


def test_sampled_chain_ends_at_the_denoisers_x0_prediction_at_t0():
    """The last ancestral step adds no noise and its posterior mean is x0_pred itself (alpha_bar_prev = 1),
    so a sample is the denoiser's x_0 prediction at t = 0 on the chain's last input."""
    model = tiny_toy()
    diffusion = create_diffusion("")
    steps = list(diffusion.p_sample_loop_progressive(model, (16, 2, 2, 2), model_kwargs=dict(y=torch.zeros(
        16, dtype=torch.long)), generator=torch.Generator().manual_seed(0)))
    last_input, final = steps[-2]["sample"], steps[-1]["sample"]
    x0 = analysis.denoiser_x0(model, diffusion, last_input, torch.zeros(16, dtype=torch.long))
    torch.testing.assert_close(final, x0, rtol=1e-6, atol=1e-9)
    # and the sampled error is this x0's |x|, the direct statistic's error at t = 0 on that input
    np.testing.assert_allclose(analysis.pixel_errors(final.double().numpy())["abs_x"],
                               np.abs(x0.double().numpy()).reshape(16, -1), rtol=1e-6)


@pytest.mark.parametrize("data", ["zeros", "constant"])
def test_denoiser_error_quantiles_are_fixed_the_max_grows(data):
    model, diffusion = tiny_toy(), create_diffusion("")
    kwargs = dict(timesteps=(0, 10), data=data, batch=10_000)  # whole batches: the small set is a prefix
    small = analysis.denoiser_x0_errors(model, diffusion, num_inputs=10_000, **kwargs)
    large = analysis.denoiser_x0_errors(model, diffusion, num_inputs=100_000, **kwargs)
    for t in (0, 10):
        assert small[t].shape == (10_000 * 8,) and large[t].shape == (100_000 * 8,)
        np.testing.assert_array_equal(small[t], large[t][:80_000])  # the same draws, extended
        q_small, q_large = analysis.fixed_quantiles(small[t]), analysis.fixed_quantiles(large[t])
        assert q_large["p50"] == pytest.approx(q_small["p50"], rel=0.03)
        assert q_large["p99"] == pytest.approx(q_small["p99"], rel=0.05)
        assert large[t].max() > small[t].max()  # a maximum only grows with more inputs
    summary = analysis.denoiser_x0_error(model, diffusion, timesteps=(0,), num_inputs=1000, data=data)
    assert list(summary) == [0] and list(summary[0]) == ["p50", "p99", "p99.9"]
    if data == "constant":  # the distance from the image's own mean: zero for a constant prediction
        assert (large[0].reshape(-1, 8).min(axis=1) >= 0).all()


def test_denoiser_error_needs_a_known_data_kind():
    with pytest.raises(ValueError, match="zeros"):
        analysis.denoiser_x0_errors(tiny_toy(), create_diffusion(""), data="ones", num_inputs=4)


def test_error_stats_on_a_hand_made_array():
    values = np.concatenate([np.arange(1.0, 101.0), [np.nan, np.inf, -np.inf]])  # 1..100 and 3 non-finite
    stats = analysis.error_stats(values)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["median"] == pytest.approx(50.5)
    assert stats["p99"] == pytest.approx(99.01)  # numpy's linear interpolation: 1 + 0.99 * 99
    assert stats["max"] == 100.0
    assert stats["nonfinite"] == 3
    assert np.isnan(analysis.error_stats([np.nan])["median"])


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


def test_the_fixed_noise_set_is_identical_for_every_call():
    torch.manual_seed(0)
    model = build_model("ToyDiT-XS/1", norm="layernorm").eval()
    for p in model.final_layer.parameters():  # leave adaLN-Zero's zero output, so the model matters
        torch.nn.init.normal_(p, std=0.1)
    first = analysis.fixed_noise_samples(model, {}, 16, sampling_steps=10, seed=3)
    torch.randn(1000)  # the global RNG must play no part
    second = analysis.fixed_noise_samples(model, {}, 16, sampling_steps=10, seed=3)
    assert first.shape == (16, 2, 2, 2) and first.dtype == np.float64
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, analysis.fixed_noise_samples(model, {}, 16, sampling_steps=10, seed=4))


def test_seed_spread_leaves_out_what_is_not_finite():
    assert records.seed_spread([3.0, 1.0, 2.0, np.nan]) == (2.0, 1.0, 3.0)
    assert all(np.isnan(v) for v in records.seed_spread([np.inf]))
