"""fast/proof.py: a fast path runs only while it computes what models.py and diffusion/ compute, as they
are in memory. An edit to the research code must be what trains and samples, never the fast copy."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import models
from diffusion import create_diffusion
from diffusion.gaussian_diffusion import GaussianDiffusion
from ditnorm.trainer import diffusion_loss, fast_loss, optimizer_step
from fast import fused_dit, make_optimizer, proof, sample_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(norm="layernorm"):
    torch.manual_seed(0)
    return models.build_model("ToyDiT-XS/1", norm=norm)


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (n,), generator=g)
    return torch.zeros(n, 2, 2, 2), t, torch.randn(n, 2, 2, 2, generator=g), torch.zeros(n, dtype=torch.long)


def trained(model, fast, steps=2):
    """The model's parameters after `steps` training steps of the trainer's step for --fast `fast`, and the
    step (fast/'s once proven, else the plain one)."""
    model, diffusion = copy.deepcopy(model), create_diffusion("")
    ema, optimizer = copy.deepcopy(model).requires_grad_(False), make_optimizer(model.parameters(), 1e-3)
    loss_fn, reason = fast_loss(fast, model, diffusion, class_dropout=False)
    for seed in range(steps):
        loss = loss_fn(*batch(seed=seed)) if loss_fn else diffusion_loss(model, diffusion, *batch(seed=seed))
        optimizer_step(loss, model, ema, optimizer, ema_decay=0.9, world_size=1)
    step = SimpleNamespace(path=getattr(loss_fn, "path", "plain"), fast_reason=reason)
    return [p.detach().clone() for p in model.parameters()], step


def assert_trains_the_edited_model(norm="layernorm"):
    """With the edit in place: the fast path is refused, and what trains is the edited plain model."""
    model = toy(norm)
    got, step = trained(model, "auto")
    assert step.path == "plain" and "differs from the model's" in step.fast_reason
    want, _ = trained(model, "off")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.skipif(fused_dit.load_c_kernels() is None, reason="needs the C kernels (a C compiler)")
@pytest.mark.parametrize("norm", models.NORM_KINDS)
def test_the_unedited_model_takes_the_fast_path(norm):
    # what the proof costs is printed by benchmarks/bench_train.py (its setup time), not timed here
    model = toy(norm)
    _, step = trained(model, "auto", steps=0)
    assert step.path != "plain" and step.fast_reason is None


def test_an_edited_norm_forward_trains_the_edited_model(monkeypatch):
    monkeypatch.setattr(models.DynamicTanh, "forward", lambda self, x: torch.tanh(2 * self.alpha * x))
    assert_trains_the_edited_model("dyt")


def test_a_changed_activation_trains_the_edited_model(monkeypatch):
    original = models.DiTBlock.__init__

    def exact_gelu(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.mlp.act = nn.GELU()  # erf instead of the tanh approximation: ~1e-3 apart

    monkeypatch.setattr(models.DiTBlock, "__init__", exact_gelu)
    assert_trains_the_edited_model()


def test_a_reordered_block_trains_the_edited_model(monkeypatch):
    def mlp_first(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, 1)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(models.modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_msa.unsqueeze(1) * self.attn(models.modulate(self.norm1(x), shift_msa, scale_msa))

    monkeypatch.setattr(models.DiTBlock, "forward", mlp_first)
    assert_trains_the_edited_model()


def test_an_edited_loss_trains_the_edited_model(monkeypatch):
    original = GaussianDiffusion.training_losses

    def half_vb(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        terms["loss"] = terms["mse"] + 0.5 * terms["vb"]
        return terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", half_vb)
    assert_trains_the_edited_model()


def test_an_edited_model_samples_with_the_plain_loop(monkeypatch):
    monkeypatch.setattr(models.DynamicTanh, "forward", lambda self, x: torch.tanh(2 * self.alpha * x))
    model, diffusion = proof.perturbed_copy(toy("dyt")).eval(), create_diffusion("20")
    reasons = []
    got = sample_toy(model, diffusion, 6, generator=torch.Generator().manual_seed(3), log=reasons.append)
    assert len(reasons) == 1 and "sampler's step" in reasons[0]
    want = diffusion.p_sample_loop(model, (6, 2, 2, 2), model_kwargs={"y": torch.zeros(6, dtype=torch.long)},
                                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_the_check_sees_past_adaln_zero():
    """At initialisation the gates are zero and an attention edit cannot reach the loss; in the perturbed
    copy it does."""
    model = toy()
    assert not model.blocks[0].adaLN_modulation[-1].weight.any()
    copy_ = proof.perturbed_copy(model)
    assert all(p.any() for p in copy_.parameters() if p.requires_grad)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), toy().parameters(), strict=True))


def test_reasons_name_the_difference():
    plain = torch.ones(3)
    assert proof._compare("x", plain * (1 + 1e-7), plain, 1e-5, 0.0) is None
    assert "x differs" in proof._compare("x", plain * 1.001, plain, 1e-5, 0.0)
    assert "differs" in proof._compare("x", plain * float("nan"), plain, 1e-5, 0.0)


class CancellingDenoiser(nn.Module):
    """eps = gain x, its gain set so that at t = 0 the x_0 prediction (x - sqrt(1 - ab) eps) / sqrt(ab) is
    1e-4 of either term, as a trained toy's is: the step there amplifies its output's rounding ~1e4-fold."""

    config = {"in_channels": 2, "input_size": 2}

    def __init__(self, diffusion):
        super().__init__()
        ratio = diffusion.sqrt_recip_alphas_cumprod[0] / diffusion.sqrt_recipm1_alphas_cumprod[0]
        self.gain = nn.Parameter(torch.tensor(float(ratio * (1 - 1e-4))))

    def forward(self, x, t, y):
        return torch.cat([self.gain * x, torch.zeros_like(x)], dim=1)  # (N, 2C, H, W): eps, variance 0


def test_a_sampler_step_is_allowed_what_float32_rounding_moves_it(monkeypatch):
    diffusion = create_diffusion("")
    model = CancellingDenoiser(diffusion)

    def scaled_output(m, scale):  # a "fast" step: p_sample with the network's output multiplied by scale
        def step(x, i, generator):
            t, y = torch.full((len(x),), i), torch.zeros(len(x), dtype=torch.long)
            return diffusion.p_sample(lambda *a, **k: m(*a, **k) * scale, x, t, model_kwargs={"y": y},
                                      generator=generator)["sample"]
        return step

    eps = torch.finfo(torch.float32).eps
    # 4 ulps off in the output, as another correct float32 network might be: 5e-5 relative at t = 0
    assert proof.check_sampler_step(lambda m: scaled_output(m, 1 + 4 * eps), model, diffusion) is None
    # within RTOL alone it would be refused: the rounding allowance is what accepts it
    monkeypatch.setattr(proof, "OUTPUT_ULPS", 0)
    assert "t=0" in proof.check_sampler_step(lambda m: scaled_output(m, 1 + 4 * eps), model, diffusion)
    monkeypatch.undo()
    # an edit of 1e-5 in the output (the size of exact against tanh GELU) is refused
    reason = proof.check_sampler_step(lambda m: scaled_output(m, 1 + 1e-5), model, diffusion)
    assert reason is not None and "the sampler's step at t=0 differs" in reason
