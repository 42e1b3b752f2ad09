"""diffusion's variational bound (calc_bpd_loop) against a case whose bound is known in closed form."""

import math

import torch

from diffusion import create_diffusion
from diffusion.diffusion_utils import HALF_BIN


def oracle(diffusion, x_start, v=-1.0):
    """A model that knows x_0: it returns the exact eps of x_t and variance channel v (-1: beta_tilde_t)."""

    def model(x_t, t):
        c = diffusion.coefficients(t, x_t)
        eps = (x_t - c.sqrt_alphas_cumprod * x_start) / c.sqrt_one_minus_alphas_cumprod
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model


def test_the_bound_of_a_model_that_knows_the_data_is_its_prior_and_decoder_in_closed_form():
    diffusion = create_diffusion("", diffusion_steps=100)
    level = 100  # an interior 8-bit level, so the decoder's bin is closed on both sides
    c = -1.0 + 2.0 * level / 255.0
    x_start = torch.full((2, 1, 2, 2), c, dtype=torch.float64)
    out = diffusion.calc_bpd_loop(oracle(diffusion, x_start), x_start,
                                  generator=torch.Generator().manual_seed(0))
    # Every KL term is 0 (the model's posterior is the true one); the decoder is N(x_0, beta_tilde_1).
    assert out["vb_bpd"].abs().max() < 1e-9
    alpha_bar = diffusion.alphas_cumprod[-1]
    prior = 0.5 * (-1.0 - math.log(1 - alpha_bar) + (1 - alpha_bar) + alpha_bar * c * c) / math.log(2)
    sigma = math.sqrt(diffusion.posterior_variance[1])
    decoder = -math.log(math.erf(HALF_BIN / (sigma * math.sqrt(2)))) / math.log(2)
    assert torch.allclose(out["prior_bpd"], torch.full((2,), prior, dtype=torch.float64), rtol=1e-9)
    assert torch.allclose(out["decoder_bpd"], torch.full((2,), decoder, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(out["total_bpd"], torch.full((2,), prior + decoder, dtype=torch.float64), rtol=1e-6)


def test_a_wrong_variance_costs_bits_and_singleton_strata_give_the_whole_sum():
    diffusion = create_diffusion("", diffusion_steps=50)
    x_start = torch.full((1, 1, 2, 2), -1.0 + 2.0 * 30 / 255.0, dtype=torch.float64)
    model = oracle(diffusion, x_start, v=0.5)  # the mean is right, the variance is not: every KL > 0
    full = diffusion.calc_bpd_loop(model, x_start, generator=torch.Generator().manual_seed(0))
    assert (full["vb_bpd"] > 0).all()
    strata = diffusion.bound_strata(49, generator=torch.Generator().manual_seed(1))
    assert [s for s, _ in strata] == [(t, t + 1) for t in range(1, 50)]
    same = diffusion.calc_bpd_loop(model, x_start, timesteps=strata,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(same["total_bpd"], full["total_bpd"], rtol=1e-12)
    # Coarser strata partition 1..T-1 (the first `exact` alone), each index inside its stratum, and their
    # estimate scatters around the whole sum: the mean of many draws is within a few standard errors.
    draws = torch.Generator().manual_seed(2)
    for _ in range(5):
        strata = diffusion.bound_strata(8, draws, exact=5)
        assert [t for (low, high), _ in strata for t in range(low, high)] == list(range(1, 50))
        assert all(low <= t < high for (low, high), t in strata)
    estimates = torch.stack([
        diffusion.calc_bpd_loop(model, x_start, timesteps=diffusion.bound_strata(8, draws, 5),
                                generator=torch.Generator().manual_seed(0))["vb_bpd"]
        for _ in range(200)]).squeeze(1)
    error = abs(estimates.mean().item() - full["vb_bpd"].item())
    assert 0 < estimates.std() and error < 4 * estimates.std().item() / math.sqrt(len(estimates))


def test_per_sample_geometric_strata_partition_the_steps_and_both_clip_settings_share_one_call():
    diffusion = create_diffusion("", diffusion_steps=200)
    strata = diffusion.bound_strata(12, torch.Generator().manual_seed(0), exact=5, size=300,
                                    spacing="geometric")
    assert [t for (low, high), _ in strata for t in range(low, high)] == list(range(1, 200))
    widths = [high - low for (low, high), _ in strata[5:]]
    assert widths[0] < widths[-1] / 10  # narrow where the terms change fast
    assert [t for _, t in strata[:5]] == [1, 2, 3, 4, 5]  # the exact terms: the same for every sample
    for (low, high), t in strata[5:]:
        assert t.shape == (300,) and int(t.min()) >= low and int(t.max()) < high
        assert high - low == 1 or len(t.unique()) > 1  # each sample draws its own timestep
    # One network call per term gives both settings, each what a call with that setting alone gives.
    x_start = torch.full((3, 1, 2, 2), -1.0 + 2.0 * 30 / 255.0, dtype=torch.float64)
    model = oracle(diffusion, x_start * 1.5, v=0.5)  # it predicts x_0 outside [-1, 1]: clipping matters
    chosen = diffusion.bound_strata(6, torch.Generator().manual_seed(1), exact=3, size=3, spacing="geometric")
    both = diffusion.calc_bpd_loop(model, x_start, timesteps=chosen, clip_denoised=(True, False),
                                   generator=torch.Generator().manual_seed(2))["total_bpd"]
    for i, clip in enumerate((True, False)):
        alone = diffusion.calc_bpd_loop(model, x_start, timesteps=chosen, clip_denoised=clip,
                                        generator=torch.Generator().manual_seed(2))["total_bpd"]
        assert both.shape == (2, 3) and torch.allclose(both[i], alone, rtol=1e-12)
    assert (both[0] < both[1]).all()  # the clipped mean is nearer the data's
