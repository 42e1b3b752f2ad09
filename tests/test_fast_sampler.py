"""sample_toy: the same numbers as diffusion.p_sample_loop with the same generator or noise (the C loop with
fast="proven", whether or not it is faster here; tests/test_fast_speed.py checks the timing gate)."""

import pytest
import torch
from builders import randomize

from diffusion import create_diffusion
from fast.sampler import index_driven_loop, loop_draws, sample_toy
from models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like(name, norm="layernorm", seed=0, **overrides):
    """A toy model with every weight moved off its adaLN-Zero initialisation (its output is not zero)."""
    torch.manual_seed(seed)
    return randomize(build_model(name, norm=norm, **overrides).eval(), seed, std=0.01, add=True)


def plain(model, diffusion, n, **kwargs):
    """The reference: the diffusion's own ancestral loop."""
    y = torch.zeros(n, dtype=torch.long)
    return diffusion.p_sample_loop(model, (n, 2, 2, 2), model_kwargs={"y": y}, **kwargs)


def assert_same_samples(got, want):
    """Equal to float tolerance, relative to the samples' scale."""
    assert got.shape == want.shape and torch.isfinite(want).all()
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("norm", ["layernorm", "none", "dyt"])
def test_matches_p_sample_loop_with_the_same_generator(norm):
    model, diffusion = trained_like("ToyDiT-XS/1", norm), create_diffusion("")
    got = sample_toy(model, diffusion, 6, generator=torch.Generator().manual_seed(3), fast="proven")
    want = plain(model, diffusion, 6, generator=torch.Generator().manual_seed(3))
    assert_same_samples(got, want)
    other = sample_toy(model, diffusion, 6, generator=torch.Generator().manual_seed(4), fast="proven")
    assert not torch.allclose(got, other)  # the generator really drives the draws


def test_matches_with_given_noise_and_respacing():
    model, diffusion = trained_like("ToyDiT/1"), create_diffusion("100")
    noise = torch.randn(5, 2, 2, 2)
    kept = noise.clone()
    got = sample_toy(model, diffusion, 5, noise=noise, generator=torch.Generator().manual_seed(1),
                     fast="proven")
    assert torch.equal(noise, kept)  # the caller's noise is not the sampler's working buffer
    want = plain(model, diffusion, 5, noise=noise, generator=torch.Generator().manual_seed(1))
    assert_same_samples(got, want)


def test_diffusions_outside_the_fast_path_use_the_plain_loop():
    model, diffusion = trained_like("ToyDiT-XS/1"), create_diffusion("20", predict_xstart=True)
    with pytest.warns(UserWarning, match="fast sampler not used: .*eps prediction"):  # it says why
        got = sample_toy(model, diffusion, 4, generator=torch.Generator().manual_seed(2))
    want = plain(model, diffusion, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, want)


def test_matches_for_patches_larger_than_one_pixel():
    # The C sampling step cuts images into patches and puts them back itself; patch 4 of 4 channels.
    model = trained_like("DiT-S/4", input_size=8, depth=2, num_classes=1)
    diffusion = create_diffusion("20")
    got = sample_toy(model, diffusion, 3, generator=torch.Generator().manual_seed(5), fast="proven")
    y = torch.zeros(3, dtype=torch.long)
    want = diffusion.p_sample_loop(model, (3, 4, 8, 8), model_kwargs={"y": y},
                                   generator=torch.Generator().manual_seed(5))
    assert_same_samples(got, want)


@pytest.mark.parametrize("steps", ["", "50"], ids=["1000 steps", "respaced to 50"])
def test_index_driven_loop_matches_p_sample_loop(steps):
    """The CUDA sampler's step (timestep index on the device, all draws made up front) run eagerly on the
    CPU; on CUDA the same step is captured in a CUDA graph (benchmarks/bench_sample.py --device cuda)."""
    model, diffusion = trained_like("ToyDiT-XS/1", "dyt"), create_diffusion(steps)
    x_T, noise_at = loop_draws((5, 2, 2, 2), diffusion.num_timesteps, "cpu", torch.Generator().manual_seed(7))
    kept = x_T.clone()
    got = index_driven_loop(model, diffusion, x_T, noise_at, capture=False)
    assert torch.equal(x_T, kept)
    want = plain(model, diffusion, 5, generator=torch.Generator().manual_seed(7))
    assert_same_samples(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_sampler_matches_p_sample_loop_on_cuda():
    model, diffusion = trained_like("ToyDiT/1").cuda(), create_diffusion("")
    got = sample_toy(model, diffusion, 7, generator=torch.Generator().manual_seed(3), device="cuda")
    y = torch.zeros(7, dtype=torch.long, device="cuda")
    want = diffusion.p_sample_loop(model, (7, 2, 2, 2), model_kwargs={"y": y}, device="cuda",
                                   generator=torch.Generator().manual_seed(3))
    assert_same_samples(got, want)
