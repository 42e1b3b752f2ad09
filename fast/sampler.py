"""Fast ancestral sampling of the toy models (class 0, no guidance).

`sample_toy` returns the same numbers as `diffusion.p_sample_loop` with the same generator, faster: the
conditioning of a DiT depends only on (t, y), so every adaLN modulation of all timesteps is computed once
before the loop; the schedule coefficients are gathered once; and each step runs the network and the
update in one C call (fast/kernels.py) instead of the module tree. Random numbers are drawn exactly as
the plain loop draws them (x_T, then one draw of the sample's shape per step, the last one unused).
On CUDA the draws are all made first, in that order, and each step replays one captured CUDA graph
(`index_driven_loop`).
"""

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .fused_dit import DiTPlan, adaln_stacked, c_kernels, keep_freed_memory
from .proof import check_sampler_step
from .speed import choose, describe, key_of


def fast_sampler_reason(model, diffusion, device):
    """None if the fast sampler has a path for this model, diffusion and device, else why not."""
    if not (diffusion.model_mean_type == "epsilon" and diffusion.model_var_type == "learned_range"):
        return "the fast sampler handles eps prediction with a learned-range variance only"
    kind = torch.device(device).type
    if kind == "cuda":
        return None
    if kind != "cpu":
        return f"no fast sampler for device {device}"
    if c_kernels() is None:
        return "the C kernels did not build or load here (the warning says why)"
    return DiTPlan(model).reason


class _CpuSampler:
    """The CPU fast path for num_samples samples: every step's adaLN vectors and schedule coefficients
    computed up front, each step's network and update in one C call."""

    def __init__(self, model, diffusion, num_samples):
        self.plan, self.kern = DiTPlan(model), c_kernels()
        num_steps = diffusion.num_timesteps
        # The network sees the original timestep index (respacing keeps a map from the respaced one).
        model_t = diffusion.model_timesteps(torch.arange(num_steps))  # (S,)
        y = torch.zeros(num_steps, dtype=torch.long)
        cond = model.t_embedder(model_t) + model.y_embedder(y, model.training)  # (S, D)
        w_mod, b_mod = adaln_stacked(model)
        self.mods = torch.addmm(b_mod, F.silu(cond), w_mod.t())  # (S, K): every adaLN vector of every step
        self.coef = _step_coefficients(diffusion)  # (S, 7) float32, the values p_sample would gather
        self.c_step = self.kern.sampler(self.plan, num_samples, model.pos_embed, DiTPlan.weights(model))

    def step(self, x, z, i):
        """x_{t-1} from x_t at timestep index i with the draw z; x (N, C, H, W), contiguous, in place."""
        self.c_step(x, z, self.mods[i:i + 1], self.coef[i])
        return x


def _one_step(model, diffusion, device):
    """step(x, i, generator) -> x_{t-1}: one step of the fast path, for fast.proof.check_sampler_step."""
    if torch.device(device).type == "cuda":
        def cuda_step(x, i, generator):
            noise_at = torch.zeros(diffusion.num_timesteps, *x.shape, device=x.device)
            noise_at[i] = _randn(x.shape, x.device, generator)
            return index_driven_loop(model, diffusion, x, noise_at, capture=False, start=i, steps=1)
        return cuda_step

    def cpu_step(x, i, generator):
        sampler = _CpuSampler(model, diffusion, len(x))
        return sampler.step(x.contiguous(), _randn(x.shape, x.device, generator), i)
    return cpu_step


@torch.no_grad()
def sample_toy(model, diffusion, num_samples: int, *, generator=None, device="cpu", progress=False,
               noise=None, fast="auto", log=None):
    """Return (num_samples, C, H, W) final samples of p_sample_loop for class label 0.

    fast: "auto" takes the fast path once fast.proof has checked one step of it against diffusion.p_sample
    with the model as it is and, on the CPU, fast/speed.py has found its step faster than p_sample's for
    num_samples samples (timed once per CPU, model, sample count and thread count; log, if given, gets
    both times when timed now); "proven" skips the timing (tests, benchmarks); "off" (or a failed check,
    or a slower fast step) samples with diffusion.p_sample_loop, and log (a callable; default
    warnings.warn) gets the reason in one line. On CUDA the loop replays a captured CUDA graph per step
    (index_driven_loop) and shows no progress bar.

    On the CPU fast path this calls kernels.keep_freed_memory(), a process-wide glibc setting (freed
    memory stays in the heap instead of going back to the OS after every step)."""
    cfg = model.config
    shape = (num_samples, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    reason = "fast='off'" if fast == "off" else fast_sampler_reason(model, diffusion, device)
    if reason is None:
        reason = check_sampler_step(lambda m: _one_step(m, diffusion, device), model, diffusion)
    if reason is None and fast == "auto" and torch.device(device).type == "cpu":
        timing = _timing(model, diffusion, num_samples)
        if timing["choice"] == "fast" and not timing["cached"] and log:
            log("fast sampler timed against the plain one: " + describe(timing, "step"))
        if timing["choice"] != "fast":
            reason = "not clearly faster here: " + describe(timing, "step")
    if reason is not None:
        if fast != "off":
            (log or warnings.warn)(f"fast sampler not used: {reason}; sampling with diffusion.p_sample_loop")
        y = torch.zeros(num_samples, dtype=torch.long, device=device)
        return diffusion.p_sample_loop(model, shape, noise=noise, clip_denoised=False, model_kwargs={"y": y},
                                       device=device, progress=progress, generator=generator)
    if torch.device(device).type == "cuda":
        x_T, noise_at = loop_draws(shape, diffusion.num_timesteps, device, generator, noise)
        return index_driven_loop(model, diffusion, x_T, noise_at, capture=True)

    sampler = _CpuSampler(model, diffusion, num_samples)
    keep_freed_memory()  # each step's few-hundred-kB tensors would otherwise be fresh mmap'ed pages
    x = noise.to(device) if noise is not None else _randn(shape, device, generator)
    x = x.clone(memory_format=torch.contiguous_format)  # updated in place; never the caller's noise
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps)
    for i in steps:
        # drawn at every step, as p_sample does, even when unused (t = 0)
        sampler.step(x, _randn(shape, device, generator), i)
    return x


def _timing(model, diffusion, num_samples):
    """fast/speed.py's record of one fast CPU step against one diffusion.p_sample, num_samples samples."""
    keep_freed_memory()  # as the fast path runs (process-wide; the plain loop runs under it too)
    sampler, i = _CpuSampler(model, diffusion, num_samples), diffusion.num_timesteps // 2
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    x, z = (torch.randn(num_samples, cfg["in_channels"], cfg["input_size"], cfg["input_size"],
                        generator=generator) for _ in range(2))  # (N, C, H, W)
    t, y = torch.full((num_samples,), i), torch.zeros(num_samples, dtype=torch.long)

    def plain():
        return diffusion.p_sample(model, x, t, clip_denoised=False, model_kwargs={"y": y})

    key = key_of("sample", sampler.kern, model, batch=num_samples)
    return choose(key, lambda: sampler.step(x.clone(), z, i), plain)


def _ancestral_step(x, out, coef_t, z):
    """p_sample's x_{t-1} = mean + nonzero exp(log_variance / 2) z from x_t (N, C, H, W) and the network's
    output (N, 2C, H, W) (eps, learned-range variance); coef_t: the 7 values of _step_coefficients at t, as
    floats or as a (7,) tensor (no host sync inside a CUDA graph)."""
    channels = x.shape[1]
    eps, v = out[:, :channels], out[:, channels:]
    recip, recipm1, coef1, coef2, log_beta, log_post, nonzero = coef_t
    pred_xstart = recip * x - recipm1 * eps
    mean = coef1 * pred_xstart + coef2 * x
    frac = (v + 1) / 2
    log_variance = frac * log_beta + (1 - frac) * log_post
    return mean + nonzero * torch.exp(0.5 * log_variance) * z


def loop_draws(shape, num_steps, device, generator=None, noise=None):
    """Every draw of p_sample_loop up front, in its order: x_T (unless `noise` is given), then one per step.
    Returns x_T and noise_at (S, *shape), noise_at[i] the draw used at timestep i."""
    x_T = noise.to(device) if noise is not None else _randn(shape, device, generator)
    noise_at = torch.empty(num_steps, *shape, device=device)
    for i in range(num_steps - 1, -1, -1):  # p_sample_loop's order: timesteps S-1, ..., 0
        noise_at[i] = _randn(shape, device, generator)
    return x_T, noise_at


@torch.no_grad()
def index_driven_loop(model, diffusion, x_T, noise_at, *, capture, start=None, steps=None):
    """The ancestral loop for class 0 with the timestep index kept on the device, so that one step is one
    fixed sequence of kernels: on CUDA (capture=True) it is captured once in a CUDA graph and replayed for
    every step, instead of ~100 kernel launches per step from Python (100 samples x 1000 steps on an H100:
    0.44 s against 3.34 s for p_sample_loop, benchmarks/h100_2026-11-26.md B2; no progress bar).
    x_T (N, C, H, W); noise_at (S, N, C, H, W), noise_at[i]
    the draw that p_sample uses at timestep i. Returns x_0. capture=False runs the same step eagerly (the
    CPU tests compare that with p_sample_loop); start and steps (eager only) run `steps` steps from
    timestep index `start` instead of the whole loop."""
    num_steps, device = diffusion.num_timesteps, x_T.device
    model_t = diffusion.model_timesteps(torch.arange(num_steps, device=device))  # (S,)
    coef = _step_coefficients(diffusion).to(device)  # (S, 7)
    y = torch.zeros(len(x_T), dtype=torch.long, device=device)
    x = x_T.clone(memory_format=torch.contiguous_format)  # updated in place
    first = num_steps - 1 if start is None else start
    index = torch.full((1,), first, dtype=torch.long, device=device)  # the current timestep

    def step():  # kernels only: index_select, never a Python int from the device
        t = model_t.index_select(0, index).expand(len(x))  # (N,)
        out = model(x, t, y)  # (N, 2C, H, W)
        x.copy_(_ancestral_step(x, out, coef.index_select(0, index)[0], noise_at.index_select(0, index)[0]))
        index.sub_(1)

    if not capture:
        for _ in range(first + 1 if steps is None else steps):
            step()
        return x
    side = torch.cuda.Stream(device)  # one warm-up step on a side stream (as capture requires), undone
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    x.copy_(x_T)
    index.fill_(num_steps - 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        step()
    for _ in range(num_steps):
        graph.replay()
    return x


def _step_coefficients(diffusion):
    """Per-step float32 coefficients (S, 7): 1/sqrt(ab), sqrt(1/ab - 1), posterior coefs, log betas, ..."""
    columns = [diffusion.sqrt_recip_alphas_cumprod, diffusion.sqrt_recipm1_alphas_cumprod,
               diffusion.posterior_mean_coef1, diffusion.posterior_mean_coef2, np.log(diffusion.betas),
               diffusion.posterior_log_variance_clipped, np.arange(diffusion.num_timesteps) != 0]
    # Cast to float32 first, as the plain loop does, so the products round the same way.
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.float64)).float()


def _randn(shape, device, generator):
    """A standard normal draw as the diffusion's loops make it (a CPU generator may serve any device)."""
    device = torch.device(device)
    if generator is None or generator.device == device:
        return torch.randn(shape, device=device, dtype=torch.float32, generator=generator)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device=generator.device).to(device)
