"""ditnorm/ablation.py: each mode removes what it says, the renormalisation control keeps what the norms
see, and the channels are chosen on other images than those measured."""

import pytest
import torch
from builders import levels, tiny_dit

from diffusion import create_diffusion
from ditnorm import ablation
from ditnorm import image_metrics as metrics
from ditnorm.analysis import capture_block_outputs


def norm_views(model, x, t, y, *modes):
    """What block 1's norm1 outputs for the inputs: plain, then under each (mode, channels) ablation of
    block 0 (channel_mean: 7 everywhere)."""
    seen = []

    def run():  # the recorder hooks the norm after the ablation's own hooks, so it sees their output
        handle = model.blocks[1].norm1.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            with torch.no_grad():
                model(x, t, y)
        finally:
            handle.remove()

    run()
    for mode, channels in modes:
        with ablation.ablated(model, 0, channels, mode, torch.full((64,), 7.0)):
            run()
    return seen


def test_the_stats_ablation_keeps_each_tokens_statistics_at_the_next_norm_and_removes_the_content():
    model, x, y = tiny_dit(), levels(5), torch.arange(5)
    t = torch.full((5,), 20)
    with torch.no_grad():
        model.x_embedder.proj.bias[3] = 20.0  # channel 3 holds most of every token's variance
    plain, stats, zero, mean = norm_views(model, x, t, y, ("stats", [3]), ("zero", [3]), ("mean", [3]))
    others = [c for c in range(64) if c != 3]
    # The next LayerNorm normalises with each token's mean and variance unchanged: the other channels'
    # outputs are the plain ones, and channel 3 comes out at (0 - mean) / std, the token's own statistics.
    assert torch.allclose(stats[..., others], plain[..., others], atol=1e-5)
    stream = capture_block_outputs(model, x, t, y)[0]  # block 0's output, unablated (N, T, D)
    mu, sd = stream.mean(-1), stream.var(-1, unbiased=False).add(1e-6).sqrt()
    assert torch.allclose(stats[..., 3], -mu / sd, atol=1e-4)
    assert not torch.allclose(stats[..., 3], plain[..., 3], atol=1e-2)
    # Zeroing (and a constant in its place) rescales every other channel: the renormalisation.
    for ablated in (zero, mean):
        ratio = (ablated[..., others].norm(dim=-1) / plain[..., others].norm(dim=-1))
        assert (ratio > 1.5).all()


@pytest.mark.parametrize("norm", ["none", "dyt"])
def test_without_statistics_in_the_norm_the_stats_ablation_is_zeroing(norm, one_thread):
    diffusion = create_diffusion("", diffusion_steps=100)
    model, x, y = tiny_dit(norm), levels(20), torch.arange(20) % 10
    out = ablation.ablation_modes(model, diffusion, x, y, 0, [3, 9], torch.zeros(64), random_draws=3)
    assert out["stats_top_rise"] == out["zero_top_rise"] == out["mean_top_rise"] != 0  # a zero mean: zeroing
    assert out["stats_random_rise"] == out["zero_random_rise"]
    assert out["base"] == metrics.heldout_loss(model, diffusion, x, y)  # the hooks are gone afterwards


def test_channels_chosen_on_training_images_and_random_controls_matched_in_count(one_thread):
    diffusion = create_diffusion("", diffusion_steps=100)
    model = tiny_dit(seed=1)
    with torch.no_grad():
        model.x_embedder.proj.bias[3] = 20.0  # channel 3 leads every token from the embedding on
    train_x, train_y = levels(30, seed=1), torch.arange(30) % 10
    block, channels, channel_mean = ablation.choose(model, diffusion, train_x, train_y)
    assert channels[0] == 3 and len(channels) == 2 and block in (0, 1) and channel_mean.shape == (64,)
    assert channel_mean[3] > 10  # its recurring value, measured on the training images
    x, y = levels(20, seed=2), torch.arange(20) % 10
    out = ablation.ablation_modes(model, diffusion, x, y, block, channels, channel_mean, random_draws=4)
    assert out["n"] == 2 * 20 and len(out["random_sets"]) == 4
    assert all(len(s) == 2 and not set(s) & set(channels) for s in out["random_sets"])
    assert len({tuple(s) for s in out["random_sets"]}) == 4
    # Zeroing the planted channel moves the loss more than zeroing random ones; as it is nearly constant,
    # putting its training mean in its place moves it far less.
    assert abs(out["zero_top_rise"]) > abs(out["zero_random_rise"]) + 3 * out["zero_random_rise_sd"]
    assert abs(out["mean_top_rise"]) < 0.2 * abs(out["zero_top_rise"])
    assert 0 < out["zero_top_rise_se"] < abs(out["zero_top_rise"])
