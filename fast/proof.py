"""The check every fast path passes before it replaces the research code.

A fast path is a second implementation of models.py and diffusion/. It may only run when, on the model
as it is in memory (edited classes, functions and monkeypatches included), it computes what the plain
code computes. These functions compare the two on small batches drawn for the purpose and return None
when they agree, else a one-line reason; the callers then run the plain path and log the reason.

Two states are compared: the model as it is, and a copy whose zero-initialised weights (adaLN-Zero: the
gates and the final layer) are replaced by small random values. At DiT's initialisation the gates are
zero, so most of the network does not reach the loss, and an edit there would go unseen; in the copy
every branch carries signal.
"""

import copy
import math

import torch

# The C path and the model agree to 4e-7 relative on the toy (float32 sums in another order; every norm
# kind, docs/performance.md). An edit shows at the size of its own effect: exact instead of tanh GELU moved
# a gradient by 2e-6 relative, a changed DyT or block order by 1e-4 and more (tests/test_fast_proof.py).
RTOL = 1e-5
# A sampler step can amplify float32 rounding far beyond RTOL: at t = 0 a trained toy's x_0 = (x_1 - 0.01
# eps) / 0.99995 is the small difference of two near-equal terms (its error is what the study measures),
# and correct fast steps were refused at 1.2-1.5x RTOL on trained checkpoints (docs/results-notes.md). So
# a step is also allowed what moving the plain network's output by float32 rounding moves it:
# OUTPUT_ULPS ulps at random, a few times the 4e-7 by which two correct implementations' outputs differ.
OUTPUT_ULPS = 16
CHECK_BATCH = 32
SEED = 1234


def perturbed_copy(model, std=0.02, seed=SEED):
    """A deep copy of model whose all-zero parameters (adaLN-Zero) get N(0, std^2) values."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return other


def check_batch(model, diffusion, batch=CHECK_BATCH, seed=SEED):
    """(x_start, t, noise, y) on the model's device: non-zero data, the first and last timesteps included."""
    cfg = model.config
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    x_start = 0.5 * torch.randn(shape, generator=generator)  # (B, C, H, W)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=generator)
    t[0], t[-1] = 0, diffusion.num_timesteps - 1
    noise = torch.randn(shape, generator=generator)
    y = torch.randint(0, cfg["num_classes"], (batch,), generator=generator)
    return tuple(v.to(device) for v in (x_start, t, noise, y))


def _one_line(err):
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _same_randomness(device, fn):
    """fn() with the global generators reseeded and restored after, so two paths draw the same labels."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED)
        return fn()


def _loss_and_grads(loss_fn, model, inputs):
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device

    def run():
        loss = loss_fn(*inputs)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        return loss.detach(), grads

    return _same_randomness(device, run)


def _compare(name, fast, plain, rtol, scale):
    """None if ||fast - plain|| <= rtol * max(||plain||, scale), else the reason."""
    error = (fast.double() - plain.double()).norm().item()
    bound = rtol * max(plain.double().norm().item(), scale)
    if math.isfinite(error) and error <= bound:
        return None
    return f"{name} differs from the model's by {error:.3g} (allowed {bound:.3g})"


def _compare_all(fast, plain, names, rtol):
    """Compare two (loss, [grad]) pairs; gradients near zero are judged against the largest one's size."""
    reason = _compare("the loss", fast[0], plain[0], rtol, 0.0)
    scale = max(g.double().norm().item() for g in plain[1]) * 1e-3
    for name, a, b in zip(names, fast[1], plain[1], strict=True):
        reason = reason or _compare(f"the gradient of {name}", a, b, rtol, scale)
    return reason


def check_loss(make_loss, plain_loss, model, diffusion, rtol=RTOL):
    """None if make_loss(m) computes plain_loss(m)'s loss and gradients, for m the model and its perturbed
    copy; else the first difference, in one line. Both are factories m -> loss(x_start, t, noise, y)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for label, m in (("", model), (" (adaLN-Zero weights perturbed)", perturbed_copy(model))):
        inputs = check_batch(m, diffusion)
        try:
            fast = _loss_and_grads(make_loss(m), m, inputs)
        except (RuntimeError, ValueError, TypeError, AttributeError) as err:
            return f"the fast path failed on the check batch: {_one_line(err)}"
        reason = _compare_all(fast, _loss_and_grads(plain_loss(m), m, inputs), names, rtol)
        if reason:
            return reason + label
    return None


def check_sampler_step(make_step, model, diffusion, rtol=RTOL, batch=8):
    """None if make_step(m)(x, i, generator) returns diffusion.p_sample(m, x, i, ...)'s sample (class 0, the
    same generator state) at the last, a middle and the first timestep, for m the model and its perturbed
    copy; else the reason. Allowed: rtol of the sample's norm, or what moving the plain network's outputs
    by OUTPUT_ULPS float32 ulps moves it, whichever is larger."""
    cfg = model.config
    device = next(model.parameters()).device
    shape = (batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    steps = sorted({diffusion.num_timesteps - 1, diffusion.num_timesteps // 2, 0})
    for label, m in (("", model), (" (adaLN-Zero weights perturbed)", perturbed_copy(model))):
        step = make_step(m)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        for i in steps:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED + i)).to(device)
            t = torch.full((batch,), i, dtype=torch.long, device=device)
            with torch.no_grad():
                try:
                    fast = step(x.clone(), i, torch.Generator().manual_seed(SEED))
                except (RuntimeError, ValueError, TypeError, AttributeError) as err:
                    return f"the fast sampler failed on the check batch: {_one_line(err)}"
                plain = diffusion.p_sample(m, x, t, model_kwargs={"y": y},
                                           generator=torch.Generator().manual_seed(SEED))["sample"]
                rounded = diffusion.p_sample(_rounded(m, OUTPUT_ULPS), x, t, model_kwargs={"y": y},
                                             generator=torch.Generator().manual_seed(SEED))["sample"]
            spread = (rounded.double() - plain.double()).norm().item()
            reason = _compare(f"the sampler's step at t={i}", fast, plain, rtol, spread / rtol)
            if reason:
                return reason + label
    return None


def _rounded(model, ulps, seed=SEED):
    """model(x, t, **kwargs) with each output value moved by up to `ulps` float32 ulps (a fixed draw): what
    float32 rounding may change in a correct implementation's output."""
    def forward(x, t, **kwargs):
        out = model(x, t, **kwargs)
        jitter = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device) * 2 - 1
        return out * (1 + ulps * torch.finfo(torch.float32).eps * jitter)
    return forward
