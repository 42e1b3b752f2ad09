"""diffusion/ against closed forms computed here, independently of the implementation (numpy float64)."""

import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, get_named_beta_schedule, space_timesteps
from diffusion.diffusion_utils import discretized_gaussian_log_likelihood, normal_kl

T = 100  # a short process keeps every test fast; the formulas do not depend on T


def linear_alpha_bar(num_steps):
    """alpha_bar of the linear schedule, by an explicit running product."""
    scale = 1000.0 / num_steps
    betas = [scale * 1e-4 + (scale * 0.02 - scale * 1e-4) * i / (num_steps - 1) for i in range(num_steps)]
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return np.array(betas), np.array(out)


def normal_cdf(z, mean, std):
    """Gaussian CDF via math.erf."""
    return 0.5 * (1 + math.erf((z - mean) / (std * math.sqrt(2))))


class ConstantOutput(torch.nn.Module):
    """A 'network' whose output is a fixed leaf tensor, so gradients w.r.t. each channel can be read."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, x, t, **kwargs):
        return self.out * 1.0


class Spy(torch.nn.Module):
    """Records the timesteps and kwargs it is called with; output is a small function of x."""

    def __init__(self, learn_sigma=True):
        super().__init__()
        self.calls, self.kwargs, self.learn_sigma = [], [], learn_sigma

    def forward(self, x, t, **kwargs):
        self.calls.append(t.clone())
        self.kwargs.append(kwargs)
        return torch.cat([0.1 * x, torch.tanh(x)], 1) if self.learn_sigma else 0.1 * x


def tiny_net(seed=0):
    """A 1x1 convolution mapping 2 channels to 4 (eps and v), deterministic weights."""
    torch.manual_seed(seed)
    net = torch.nn.Conv2d(2, 4, 1)
    return lambda x, t, **kw: torch.tanh(net(x))  # bounded, so long chains stay finite


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_formula():
    for steps in (1000, 100):
        betas, _ = linear_alpha_bar(steps)
        np.testing.assert_allclose(get_named_beta_schedule("linear", steps), betas, rtol=1e-12)


@pytest.mark.parametrize("name", ["cosine", "squaredcos_cap_v2"])
def test_cosine_schedule_matches_formula(name):
    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    betas = get_named_beta_schedule(name, T)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[-1] == 0.999  # the cap bites at the last step


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="noise schedule"):
        create_diffusion("", noise_schedule="quadratic")


# ----------------------------------------------------------------------------- forward process


def test_q_sample_exact_with_chosen_noise():
    d = create_diffusion("", diffusion_steps=T)
    _, abar = linear_alpha_bar(T)
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 17, 50, 99])
    a = torch.from_numpy(abar[t.numpy()]).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(d.q_sample(x0, t, noise), expected, rtol=1e-12, atol=1e-12)


def test_q_sample_empirical_moments():
    d = create_diffusion("", diffusion_steps=T)
    _, abar = linear_alpha_bar(T)
    n, step = 200_000, 40
    torch.manual_seed(0)
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((n,), step)).flatten()
    mean, var = 0.7 * math.sqrt(abar[step]), 1 - abar[step]
    # 5 standard errors: sd(mean) = sqrt(var / n), sd(sample variance) ~ var * sqrt(2 / n) for a Gaussian.
    assert abs(xt.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(xt.var().item() - var) < 5 * var * math.sqrt(2 / n)


# ----------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(schedule):
    d = create_diffusion("", noise_schedule=schedule, diffusion_steps=T)
    betas = get_named_beta_schedule(schedule, T)
    abar = np.cumprod(1 - betas)
    x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    xt = torch.randn_like(x0)
    t = torch.tensor([1, 30, 99])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for i, step in enumerate(t.tolist()):
        # Conjugate Gaussians: prior x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev), likelihood
        # x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta). Precisions add; means are precision-weighted.
        alpha, abar_prev = 1 - betas[step], abar[step - 1]
        precision = 1 / (1 - abar_prev) + alpha / betas[step]
        exp_mean = (math.sqrt(abar_prev) * x0[i] / (1 - abar_prev) + math.sqrt(alpha) * xt[i] / betas[step])
        exp_mean = exp_mean / precision
        torch.testing.assert_close(mean[i], exp_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(var[i], torch.full_like(x0[i], 1 / precision), rtol=1e-10, atol=0)
        exp_log_var = torch.full_like(x0[i], -math.log(precision))
        torch.testing.assert_close(log_var[i], exp_log_var, rtol=1e-10, atol=0)


def test_posterior_at_t0_is_x0_with_clipped_log_variance():
    d = create_diffusion("", diffusion_steps=T)
    x0, xt = torch.randn(2, 2, 2, 2, dtype=torch.float64), torch.randn(2, 2, 2, 2, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()
    _, var1, _ = d.q_posterior_mean_variance(x0, xt, torch.ones(2, dtype=torch.long))
    torch.testing.assert_close(log_var, var1.log())


# ----------------------------------------------------------------------------- respacing


@pytest.mark.parametrize("spacing,count", [("250", 250), ("10,20,30", 60), ("ddim50", 50), ("1000", 1000),
                                           ("ddim1000", 1000), ("", 1000), (None, 1000)])
def test_respacing_step_counts(spacing, count):
    d = create_diffusion(spacing)
    assert d.num_timesteps == count == len(d.timestep_map)


def test_respacing_known_sets():
    assert space_timesteps(100, "ddim10") == set(range(0, 100, 10))
    assert space_timesteps(10, "3") == {0, 4, 9}  # strides of 4.5, rounded, first and last kept
    assert space_timesteps(10, "1,2") == {0, 5, 9}  # two sections of 5 steps
    assert {0, 999} <= space_timesteps(1000, "250")


@pytest.mark.parametrize("bad", ["abc", "ddim", "ddimx", "ddim7", "2000", "0", "5,0", "1.5", "10;20"])
def test_bad_respacing_raises(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000 if bad != "ddim7" else 10, bad)


@pytest.mark.parametrize("spacing", ["250", "10,20,30", "ddim50"])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_respaced_alpha_bar_equals_original(spacing, schedule):
    full = create_diffusion("", noise_schedule=schedule)
    spaced = create_diffusion(spacing, noise_schedule=schedule)
    kept = spaced.timestep_map.numpy()
    assert (np.diff(kept) > 0).all()
    original = np.cumprod(1 - get_named_beta_schedule(schedule, 1000))
    # beta' = 1 - ratio and back to 1 - beta' loses ~1e-16 / ratio relatively: ratio ~1e-5 at cosine's
    # last kept step, hence 1e-9 rather than 1e-12.
    np.testing.assert_allclose(spaced.alphas_cumprod, original[kept], rtol=1e-9)
    np.testing.assert_allclose(full.alphas_cumprod, original, rtol=1e-12)


def test_network_sees_original_timesteps():
    d = create_diffusion("5", diffusion_steps=50)
    kept = sorted(space_timesteps(50, "5"))
    spy = Spy()
    d.p_sample_loop(spy, (2, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    assert [c.tolist() for c in spy.calls] == [[s, s] for s in reversed(kept)]
    spy.calls.clear()
    d.training_losses(spy, torch.zeros(5, 2, 2, 2), torch.arange(5))
    assert spy.calls[0].tolist() == kept


# ----------------------------------------------------------------------------- likelihood helpers


def test_normal_kl():
    m, lv = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().max() == 0
    # KL(N(0, 1) || N(1, 2^2)) = ln(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    expected = math.log(2) + (1 + 1) / (2 * 4) - 0.5
    got = normal_kl(torch.tensor(0.0, dtype=torch.float64), 0.0, torch.tensor(1.0, dtype=torch.float64),
                    math.log(4))
    assert abs(got.item() - expected) < 1e-12


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.3, -5.0), (-0.99, -1.0), (2.5, 0.5), (0.0, -9.0)])
def test_decoder_bins_sum_to_one(mean, log_scale):
    centres = torch.linspace(-1, 1, 256, dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(centres, torch.tensor(mean, dtype=torch.float64),
                                               torch.tensor(log_scale, dtype=torch.float64))
    assert abs(logp.exp().sum().item() - 1) < 1e-9
    # A middle bin against the normal CDF written with math.erf.
    k, std = 100, math.exp(log_scale)
    c = -1 + 2 * k / 255
    p = normal_cdf(c + 1 / 255, mean, std) - normal_cdf(c - 1 / 255, mean, std)
    assert math.isclose(logp[k].exp().item(), max(p, 1e-12), rel_tol=1e-6, abs_tol=1e-15)


# ----------------------------------------------------------------------------- model parameterisation


def test_eps_oracle_recovers_x0_and_learned_range_ends():
    d = create_diffusion("", diffusion_steps=T)
    betas, abar = linear_alpha_bar(T)
    x0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 99])
    xt = d.q_sample(x0, t, noise)
    for v, expected_log_var in ((1.0, np.log(betas[t])), (-1.0, None)):
        out = d.p_mean_variance(lambda x, tt, v=v: torch.cat([noise, torch.full_like(x, v)], 1), xt, t)
        torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-9, atol=1e-9)
        if expected_log_var is None:  # v = -1: the clipped posterior log variance
            expected_log_var = d.q_posterior_mean_variance(x0, xt, t)[2][:, 0, 0, 0].numpy()
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(), expected_log_var, rtol=1e-12)


def test_predict_xstart_mode_and_fixed_variances():
    betas, abar = linear_alpha_bar(T)
    x0 = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5])
    big = create_diffusion("", predict_xstart=True, learn_sigma=False, diffusion_steps=T)
    out = big.p_mean_variance(lambda x, tt: x0, torch.randn_like(x0), t)
    torch.testing.assert_close(out["pred_xstart"], x0)
    small_var = create_diffusion("", learn_sigma=False, sigma_small=True, diffusion_steps=T)
    post_var = small_var.q_posterior_mean_variance(x0, x0, t)[1][:, 0, 0, 0].numpy()
    # fixed_large: beta_t, except beta_tilde_1 = beta_1 (1 - abar_0) / (1 - abar_1) at t = 0.
    beta_tilde_1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    np.testing.assert_allclose(out["variance"][:, 0, 0, 0].numpy(), [beta_tilde_1, betas[5]], rtol=1e-10)
    out_small = small_var.p_mean_variance(lambda x, tt: x0, x0, t)
    np.testing.assert_allclose(out_small["variance"][:, 0, 0, 0].numpy(), post_var, rtol=1e-12)


def test_channel_mismatch_raises():
    d = create_diffusion("", diffusion_steps=T)
    with pytest.raises(ValueError, match="learn_sigma"):
        d.p_mean_variance(lambda x, t: x, torch.zeros(1, 2, 2, 2), torch.zeros(1, dtype=torch.long))


# ----------------------------------------------------------------------------- training loss


def test_hybrid_loss_detaches_mean_in_vb():
    d = create_diffusion("", diffusion_steps=T)
    torch.manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3) * 2 - 1
    noise = torch.randn_like(x0)
    model = ConstantOutput(0.5 * torch.randn(4, 4, 3, 3))
    t = torch.tensor([0, 1, 50, 99])
    terms = d.training_losses(model, x0, t, noise=noise)
    assert terms["loss"].shape == terms["mse"].shape == terms["vb"].shape == (4,)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(terms["mse"], ((noise - model.out[:, :2]) ** 2).mean((1, 2, 3)).detach())
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), model.out, retain_graph=True)
    assert (grad_vb[:, :2] == 0).all() and grad_vb[:, 2:].abs().sum() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), model.out)
    assert (grad_mse[:, 2:] == 0).all() and grad_mse[:, :2].abs().sum() > 0


def test_loss_variants():
    x0, noise, t = torch.zeros(2, 2, 2, 2), torch.randn(2, 2, 2, 2), torch.tensor([3, 7])
    out = torch.randn(2, 4, 2, 2)
    hybrid = create_diffusion("", diffusion_steps=T).training_losses(lambda x, tt: out, x0, t, noise=noise)
    rescaled = create_diffusion("", rescale_learned_sigmas=True, diffusion_steps=T).training_losses(
        lambda x, tt: out, x0, t, noise=noise)
    torch.testing.assert_close(rescaled["vb"], hybrid["vb"] * T / 1000)
    kl = create_diffusion("", use_kl=True, diffusion_steps=T).training_losses(
        lambda x, tt: out, x0, t, noise=noise)
    torch.testing.assert_close(kl["loss"], hybrid["vb"] * T)
    fixed = create_diffusion("", learn_sigma=False, diffusion_steps=T).training_losses(
        lambda x, tt: out[:, :2], x0, t, noise=noise)
    assert (fixed["vb"] == 0).all()
    torch.testing.assert_close(fixed["loss"], hybrid["mse"])


def test_vb_term_in_bits_against_closed_form():
    d = create_diffusion("", diffusion_steps=T)
    betas, abar = linear_alpha_bar(T)

    def beta_tilde(k):
        return betas[k] * (1 - abar[k - 1]) / (1 - abar[k])

    # Bin centres: both open-ended edge bins and a middle one at t = 0, then two KL steps.
    x0 = torch.tensor([-1.0, -0.2, 1.0, 0.4, -0.6], dtype=torch.float64).view(5, 1, 1, 1)
    eps, noise = torch.randn_like(x0), torch.randn_like(x0)
    v = torch.tensor([0.3, -0.5, 0.9, 0.0, -1.0], dtype=torch.float64).view(5, 1, 1, 1)
    t = torch.tensor([0, 0, 0, 7, 60])
    vb = d.training_losses(lambda x, tt: torch.cat([eps, v], 1), x0, t, noise=noise)["vb"]
    for i, step in enumerate(t.tolist()):
        a, ab, x_0 = 1 - betas[step], abar[step], x0[i].item()
        ab_prev = abar[step - 1] if step else 1.0
        xt = math.sqrt(ab) * x_0 + math.sqrt(1 - ab) * noise[i].item()
        # DDPM's mean written from eps directly: (x_t - beta / sqrt(1 - abar) eps) / sqrt(alpha).
        mean = (xt - betas[step] / math.sqrt(1 - ab) * eps[i].item()) / math.sqrt(a)
        frac = (v[i].item() + 1) / 2
        log_var = frac * math.log(betas[step]) + (1 - frac) * math.log(beta_tilde(max(step, 1)))
        if step == 0:
            std = math.exp(0.5 * log_var)
            upper = normal_cdf(x_0 + 1 / 255, mean, std) if x_0 < 0.999 else 1.0
            lower = normal_cdf(x_0 - 1 / 255, mean, std) if x_0 > -0.999 else 0.0
            expected = -math.log(upper - lower) / math.log(2)
        else:
            true_mean = (math.sqrt(ab_prev) * betas[step] * x_0
                         + math.sqrt(a) * (1 - ab_prev) * xt) / (1 - ab)
            true_var = beta_tilde(step)
            kl = 0.5 * (log_var - math.log(true_var) - 1
                        + (true_var + (true_mean - mean) ** 2) / math.exp(log_var))
            expected = kl / math.log(2)
        assert math.isclose(vb[i].item(), expected, rel_tol=1e-7), (step, vb[i].item(), expected)

# ----------------------------------------------------------------------------- sampling


def test_p_sample_adds_no_noise_at_t0():
    d = create_diffusion("", diffusion_steps=T)
    model, x = tiny_net(), torch.randn(3, 2, 2, 2)
    for step, noisy in ((0, False), (1, True)):
        t = torch.full((3,), step)
        mean = d.p_mean_variance(model, x, t)["mean"]
        sample = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(1))["sample"]
        assert torch.equal(sample, mean) != noisy


def test_ancestral_sampling_reproducible_from_seed():
    d = create_diffusion("10", diffusion_steps=T)
    model, shape = tiny_net(), (3, 2, 2, 2)
    a = d.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(0))
    b = d.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(0))
    c = d.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.allclose(a, c)


def test_ddim_eta0_deterministic_and_eta1_not():
    d = create_diffusion("ddim10", diffusion_steps=T)
    model, noise = tiny_net(), torch.randn(3, 2, 2, 2)

    def run(seed, eta):
        return d.ddim_sample_loop(model, noise.shape, noise=noise, eta=eta,
                                  generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0, 0.0), run(1, 0.0))
    assert not torch.allclose(run(0, 1.0), run(1, 1.0))


def test_ddim_step_with_eps_oracle():
    d = create_diffusion("", diffusion_steps=T)
    _, abar = linear_alpha_bar(T)
    x0 = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([20, 20])
    xt = d.q_sample(x0, t, noise)
    out = d.ddim_sample(lambda x, tt: torch.cat([noise, torch.zeros_like(x)], 1), xt, t, eta=0.0)
    # With the true eps, deterministic DDIM lands exactly on q's mean path at t - 1 with the same eps.
    expected = math.sqrt(abar[19]) * x0 + math.sqrt(1 - abar[19]) * noise
    torch.testing.assert_close(out["sample"], expected, rtol=1e-9, atol=1e-9)


def test_progressive_loop_yields_every_step_and_passes_kwargs():
    d = create_diffusion("4", diffusion_steps=T)
    spy = Spy()
    steps = list(d.p_sample_loop_progressive(spy, (2, 2, 2, 2), model_kwargs={"y": torch.tensor([0, 1]),
                                                                                  "cfg_scale": 4.0},
                                             progress=True, generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 4 and all(set(s) == {"sample", "pred_xstart"} for s in steps)
    assert all(k["cfg_scale"] == 4.0 and k["y"].tolist() == [0, 1] for k in spy.kwargs)
    assert not steps[-1]["sample"].requires_grad and torch.is_grad_enabled()


# ----------------------------------------------------------------------------- departures from official code
# Each test measures one departure listed in docs/diffusion.md against the official form, rewritten here from
# its formula, and prints the size (pytest -s tests/test_diffusion.py -k official).


def tanh_normal_cdf(z):
    """The official code's approximation of the standard normal CDF (GELU's tanh form)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def official_decoder_log_likelihood(x, means, log_scales):
    """The decoder log-likelihood with tanh_normal_cdf, every probability floored at 1e-12, as officially."""
    inv_std = torch.exp(-log_scales)
    cdf_plus = tanh_normal_cdf(inv_std * (x - means + 1 / 255))
    cdf_min = tanh_normal_cdf(inv_std * (x - means - 1 / 255))
    return torch.where(x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                       torch.where(x > 0.999, torch.log((1 - cdf_min).clamp(min=1e-12)),
                                   torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))


def decoder_scales():
    """log std of the t = 0 decoder of the 1000-step linear schedule, over the learned range's span."""
    d = create_diffusion("")
    low, high = math.log(d.posterior_variance[1]), math.log(d.betas[0])
    return 0.5 * torch.linspace(low, high, 5, dtype=torch.float64)


@pytest.mark.parametrize("data", ["toy zeros", "pixel centres"])
def test_official_decoder_cdf_difference_in_bits(data):
    x = torch.zeros(1) if data == "toy zeros" else torch.linspace(-1, 1, 256)
    x = x.double()[:, None, None]
    offsets = torch.linspace(-0.03, 0.03, 601, dtype=torch.float64)[None, :, None]  # up to 4 std
    scales = decoder_scales()[None, None, :]
    means = (x + offsets).clamp(-1, 1)
    exact = discretized_gaussian_log_likelihood(x, means, scales) / math.log(2)
    official = official_decoder_log_likelihood(x, means, scales) / math.log(2)
    within = (offsets.abs() <= 2 * scales.exp()).expand_as(exact)  # the mean within 2 std of the data
    diff = (exact - official).abs()
    print(f"\n{data}: decoder log-likelihood, exact CDF vs tanh approximation: max |difference| "
          f"{diff[within].max():.2e} bits with the mean within 2 std of x, {diff.max():.2e} bits up to 4 std")
    assert 1e-5 < diff[within].max() < 1e-2


def official_space_timesteps(num_timesteps, count):
    """One section of the official spacing: the stride accumulated in floating point."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return set(kept)


def test_official_respacing_same_steps():
    differ = [n for n in range(1, 1001) if space_timesteps(1000, [n]) != official_space_timesteps(1000, n)]
    common = [n for n in (10, 25, 50, 100, 250, 500, 1000) if n in differ]
    print(f"\nrespacing T = 1000 into 1..1000 steps: {len(differ)} counts keep other steps than officially "
          f"(first: {differ[:6]}); of 10, 25, 50, 100, 250, 500, 1000: {common or 'none'}")
    assert not common and len(differ) > 0


def test_official_cosine_schedule_same_betas():
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    loop = np.array([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    diff = np.abs(get_named_beta_schedule("cosine", 1000) - loop).max()
    print(f"\ncosine schedule, T = 1000: max |beta difference| {diff:.2e} (vectorised vs per-step loop)")
    assert diff < 1e-12
