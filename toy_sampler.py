"""Fast ancestral sampling of the toy models (class 0, no guidance).

`sample_toy` returns the same numbers as `diffusion.p_sample_loop` with the same generator, faster: the
conditioning of a DiT depends only on (t, y), so every adaLN modulation of all timesteps is computed once
before the loop; the schedule coefficients are gathered once; and each step runs the hand-written DiT
forward of fused_dit.py on the 100-odd tokens instead of the module tree (with the tiled C kernels, the
step's update too, in the same C call). Random numbers are drawn exactly
as the plain loop draws them (x_T, then one draw of the sample's shape per step, the last one unused).
On CUDA the draws are all made first, in that order, and each step replays one captured CUDA graph
(`index_driven_loop`).
"""

import numpy as np
import torch
import torch.nn.functional as F

from fused_dit import DiTPlan, default_kernels, dit_forward, keep_freed_memory


@torch.no_grad()
def sample_toy(model, diffusion, num_samples: int, *, generator=None, device="cpu", progress=False,
               noise=None):
    """Return (num_samples, C, H, W) final samples of p_sample_loop for class label 0.

    On CUDA the loop replays a captured CUDA graph per step (index_driven_loop) and shows no progress bar.

    On the CPU fast path this calls fused_dit.keep_freed_memory(), a process-wide glibc setting (freed
    memory stays in the heap instead of going back to the OS after every step)."""
    cfg = model.config
    shape = (num_samples, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    y = torch.zeros(num_samples, dtype=torch.long, device=device)
    learned_range = diffusion.model_mean_type == "epsilon" and diffusion.model_var_type == "learned_range"
    on = torch.device(device).type
    if learned_range and on == "cuda":
        x_T, noise_at = loop_draws(shape, diffusion.num_timesteps, device, generator, noise)
        return index_driven_loop(model, diffusion, x_T, noise_at, capture=True)
    plan = DiTPlan(model)
    if not (learned_range and on == "cpu" and plan.reason is None):
        return diffusion.p_sample_loop(model, shape, noise=noise, clip_denoised=False, model_kwargs={"y": y},
                                       device=device, progress=progress, generator=generator)

    num_steps = diffusion.num_timesteps
    # The network sees the original timestep index (respacing keeps a map from the respaced one).
    model_t = diffusion._model_timesteps(torch.arange(num_steps, device=device))  # (S,)
    cond = model.t_embedder(model_t) + model.y_embedder(y[:1].expand(num_steps), model.training)  # (S, D)
    w_mod, b_mod = model.adaln_stacked()
    mods = torch.addmm(b_mod, F.silu(cond), w_mod.t())  # (S, K): every adaLN vector of every step
    coef = _step_coefficients(diffusion)  # (S, 7) float32, the values p_sample would gather
    weights = DiTPlan.weights(model)
    kern = default_kernels()
    keep_freed_memory()  # each step's few-hundred-kB tensors would otherwise be fresh mmap'ed pages

    x = noise.to(device) if noise is not None else _randn(shape, device, generator)
    steps = range(num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps)
    if hasattr(kern, "sampler"):  # the network and the update in one C call per step
        step = kern.sampler(plan, num_samples, model.pos_embed, weights)
        x = x.clone(memory_format=torch.contiguous_format)  # updated in place; never the caller's noise
        for i in steps:
            step(x, _randn(shape, device, generator), mods[i:i + 1], coef[i])
        return x
    for i in steps:
        out = dit_forward(plan, kern, x, mods[i:i + 1], model.pos_embed, weights)  # (N, 2C, H, W)
        z = _randn(shape, device, generator)  # drawn at every step, as p_sample does, even when unused
        x = _ancestral_step(x, out, coef[i].tolist(), z)
    return x


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
def index_driven_loop(model, diffusion, x_T, noise_at, *, capture):
    """The ancestral loop for class 0 with the timestep index kept on the device, so that one step is one
    fixed sequence of kernels: on CUDA (capture=True) it is captured once in a CUDA graph and replayed for
    every step, instead of ~100 kernel launches per step from Python (100 samples x 1000 steps on an H100:
    0.44 s against 3.34 s for p_sample_loop, benchmarks/h100_2026-11-26.md B2; no progress bar).
    x_T (N, C, H, W); noise_at (S, N, C, H, W), noise_at[i]
    the draw that p_sample uses at timestep i. Returns x_0. capture=False runs the same step eagerly (the
    CPU tests compare that with p_sample_loop)."""
    num_steps, device = diffusion.num_timesteps, x_T.device
    model_t = diffusion._model_timesteps(torch.arange(num_steps, device=device))  # (S,)
    coef = _step_coefficients(diffusion).to(device)  # (S, 7)
    y = torch.zeros(len(x_T), dtype=torch.long, device=device)
    x = x_T.clone(memory_format=torch.contiguous_format)  # updated in place
    index = torch.full((1,), num_steps - 1, dtype=torch.long, device=device)  # the current timestep

    def step():  # kernels only: index_select, never a Python int from the device
        t = model_t.index_select(0, index).expand(len(x))  # (N,)
        out = model(x, t, y)  # (N, 2C, H, W)
        x.copy_(_ancestral_step(x, out, coef.index_select(0, index)[0], noise_at.index_select(0, index)[0]))
        index.sub_(1)

    if not capture:
        for _ in range(num_steps):
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
