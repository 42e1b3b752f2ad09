"""Fast ancestral sampling of the toy models (class 0, no guidance).

`sample_toy` returns the same numbers as `diffusion.p_sample_loop` with the same generator, faster: the
conditioning of a DiT depends only on (t, y), so every adaLN modulation of all timesteps is computed once
before the loop; the schedule coefficients are gathered once; and each step runs the hand-written DiT
forward of fused_dit.py on the 100-odd tokens instead of the module tree (with the tiled C kernels, the
step's update too, in the same C call). Random numbers are drawn exactly
as the plain loop draws them (x_T, then one draw of the sample's shape per step, the last one unused).
"""

import numpy as np
import torch
import torch.nn.functional as F

from fused_dit import DiTPlan, default_kernels, dit_forward, keep_freed_memory


@torch.no_grad()
def sample_toy(model, diffusion, num_samples: int, *, generator=None, device="cpu", progress=False,
               noise=None):
    """Return (num_samples, C, H, W) final samples of p_sample_loop for class label 0.

    On the CPU fast path this calls fused_dit.keep_freed_memory(), a process-wide glibc setting (freed
    memory stays in the heap instead of going back to the OS after every step)."""
    cfg = model.config
    shape = (num_samples, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    y = torch.zeros(num_samples, dtype=torch.long, device=device)
    plan = DiTPlan(model)
    fast = (plan.reason is None and torch.device(device).type == "cpu"
            and diffusion.model_mean_type == "epsilon" and diffusion.model_var_type == "learned_range")
    if not fast:
        return diffusion.p_sample_loop(model, shape, noise=noise, clip_denoised=False, model_kwargs={"y": y},
                                       device=device, progress=progress, generator=generator)

    num_steps = diffusion.num_timesteps
    # The network sees the original timestep index (respacing keeps a map from the respaced one).
    model_t = getattr(diffusion, "timestep_map", torch.arange(num_steps)).to(device)  # (S,)
    cond = model.t_embedder(model_t) + model.y_embedder(y[:1].expand(num_steps), model.training)  # (S, D)
    w_mod, b_mod = DiTPlan.modulation(model)
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
    channels = shape[1]
    if hasattr(kern, "sampler"):  # the network and the update in one C call per step
        step = kern.sampler(plan, num_samples, model.pos_embed, weights)
        x = x.clone(memory_format=torch.contiguous_format)  # updated in place; never the caller's noise
        for i in steps:
            step(x, _randn(shape, device, generator), mods[i:i + 1], coef[i])
        return x
    for i in steps:
        out = dit_forward(plan, kern, x, mods[i:i + 1], model.pos_embed, weights)  # (N, 2C, H, W)
        eps, v = out[:, :channels], out[:, channels:]
        recip, recipm1, coef1, coef2, log_beta, log_post, nonzero = coef[i].tolist()
        pred_xstart = recip * x - recipm1 * eps
        mean = coef1 * pred_xstart + coef2 * x
        frac = (v + 1) / 2
        log_variance = frac * log_beta + (1 - frac) * log_post
        z = _randn(shape, device, generator)  # drawn at every step, as p_sample does, even when unused
        x = mean + nonzero * torch.exp(0.5 * log_variance) * z
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
        return torch.randn(shape, device=device, generator=generator)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)
