"""Gaussian diffusion (DDPM / Improved DDPM / DDIM) as the DiT checkpoints were trained with it.

The maths is in docs/diffusion.md. Notation inside the maths: x_0 (data), x_t (noised),
eps (the Gaussian noise), alpha_bar (cumulative product of 1 - beta). Every schedule quantity is computed
once in float64 numpy; a (T, K) table of them is cached per (device, dtype) so that pulling the K
coefficients of a batch of timesteps costs one indexing kernel.
"""

import math
from collections import deque
from typing import NamedTuple

import numpy as np
import torch

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl

MODEL_MEAN_TYPES = ("epsilon", "start_x")
MODEL_VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Return the float64 betas of a named noise schedule.

    :param name: "linear" (DDPM's, rescaled so that any T spans the same range as T = 1000) or
        "cosine" / "squaredcos_cap_v2" (Improved DDPM's, betas capped at 0.999).
    :param num_diffusion_timesteps: T, the number of diffusion steps.
    :return: (T,) float64 array of betas.
    :raises ValueError: for an unknown name or a non-positive T.
    """
    T = int(num_diffusion_timesteps)
    if T < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if name == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        s = np.arange(T + 1, dtype=np.float64) / T
        alpha_bar = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # (T + 1,) at s = i / T
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise ValueError(f"unknown noise schedule {name!r}; use 'linear', 'cosine' or 'squaredcos_cap_v2'")


class Coefficients(NamedTuple):
    """Per-sample schedule coefficients, each (N, 1, ..., 1) so that it broadcasts against x."""
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod_prev: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    log_betas: torch.Tensor
    fixed_variance: torch.Tensor
    fixed_log_variance: torch.Tensor
    ddim_sigma_unit: torch.Tensor  # DDIM's sigma at eta = 1


class GaussianDiffusion:
    """A Gaussian diffusion process: forward noising, reverse-step parameterisation, losses, samplers.

    :param betas: (T,) noise schedule, each in (0, 1]; converted to float64.
    :param model_mean_type: what the network's first C output channels predict: "epsilon" (the noise)
        or "start_x" (x_0).
    :param model_var_type: "learned_range" (the last C output channels v in [-1, 1] interpolate the log
        variance between beta_tilde_t and beta_t; the network outputs 2C channels), "fixed_large"
        (variance beta_t, with beta_tilde_1 at t = 0) or "fixed_small" (variance beta_tilde_t).
    :param loss_type: "mse" (MSE, plus the VB term when the variance is learned), "rescaled_mse" (the VB
        term multiplied by T / 1000), "kl" (the VB term alone) or "rescaled_kl" (the VB term times T,
        an unbiased estimate of the whole bound).

    The model passed to the methods below is any callable model(x_t, t, **model_kwargs) returning
    (N, C or 2C, ...) with t the (N,) long tensor of timestep indices.
    """

    def __init__(self, *, betas, model_mean_type="epsilon", model_var_type="learned_range", loss_type="mse"):
        for value, allowed, what in ((model_mean_type, MODEL_MEAN_TYPES, "model_mean_type"),
                                     (model_var_type, MODEL_VAR_TYPES, "model_var_type"),
                                     (loss_type, LOSS_TYPES, "loss_type")):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D array with every value in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde_0 = 0 has no log; borrow beta_tilde_1 (with one step there is nothing to borrow).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))

        if model_var_type == "fixed_large":
            # beta_1 replaced by beta_tilde_1 at t = 0, as in Improved DDPM, for a better decoder NLL.
            fixed_variance = np.append(first, betas[1:])
            fixed_log_variance = np.log(fixed_variance)
        else:  # fixed_small; unused when the variance is learned
            fixed_variance = self.posterior_variance
            fixed_log_variance = self.posterior_log_variance_clipped
        ddim_sigma_unit = np.sqrt((1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
                                  * (1.0 - self.alphas_cumprod / self.alphas_cumprod_prev))

        columns = {
            "alphas_cumprod": self.alphas_cumprod,
            "alphas_cumprod_prev": self.alphas_cumprod_prev,
            "sqrt_alphas_cumprod": self.sqrt_alphas_cumprod,
            "sqrt_alphas_cumprod_prev": np.sqrt(self.alphas_cumprod_prev),
            "sqrt_one_minus_alphas_cumprod": self.sqrt_one_minus_alphas_cumprod,
            "sqrt_recip_alphas_cumprod": self.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_alphas_cumprod": self.sqrt_recipm1_alphas_cumprod,
            "posterior_mean_coef1": self.posterior_mean_coef1,
            "posterior_mean_coef2": self.posterior_mean_coef2,
            "posterior_variance": self.posterior_variance,
            "posterior_log_variance_clipped": self.posterior_log_variance_clipped,
            "log_betas": np.log(betas),
            "fixed_variance": fixed_variance,
            "fixed_log_variance": fixed_log_variance,
            "ddim_sigma_unit": ddim_sigma_unit,
        }
        table = np.stack([columns[f] for f in Coefficients._fields], axis=1)
        self._table64 = torch.from_numpy(table)  # (T, K)
        self._tables = {}  # (device, dtype) -> the table cast for use there

    # ----------------------------------------------------------------------------- coefficient lookup

    def coefficients(self, t: torch.Tensor, x: torch.Tensor) -> Coefficients:
        """Every schedule coefficient at timesteps t, shaped for broadcasting against x.

        :param t: (N,) long timestep indices of this diffusion (respaced ones where respaced).
        :param x: a tensor of shape (N, ...) whose device and dtype the coefficients take.
        :return: a named tuple (fields: Coefficients._fields) of (N, 1, ..., 1) tensors, one per coefficient;
            the float64 table is cast once per (device, dtype) and kept.
        """
        key = (x.device, x.dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self._table64.to(device=x.device, dtype=x.dtype)
        rows = table[t]  # (N, K)
        return Coefficients._make(rows.view(rows.shape[0], rows.shape[1], *(1,) * (x.ndim - 1)).unbind(1))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep values the network is called with at this diffusion's indices t (N,).

        The identity here; a SpacedDiffusion maps its respaced indices to the original ones."""
        return t

    def _call_model(self, model, x, t, model_kwargs):
        """Run the network and split its output into (mean part, variance part or None)."""
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1]
        if self.model_var_type == "learned_range":
            if out.shape[1] != 2 * channels:
                raise ValueError(f"the model returned {out.shape[1]} channels; a learned variance needs "
                                 f"2 x {channels} (build the model with learn_sigma=True)")
            return out[:, :channels], out[:, channels:]
        if out.shape[1] != channels:
            raise ValueError(f"the model returned {out.shape[1]} channels; a fixed variance needs "
                             f"{channels} (build the model with learn_sigma=False, or the diffusion with "
                             "learn_sigma=True)")
        return out, None

    # ----------------------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0), each broadcast to x_start's shape.

        :param x_start: (N, C, ...) clean data x_0.
        :param t: (N,) long timestep indices.
        """
        c = self.coefficients(t, x_start)
        variance = (1.0 - c.alphas_cumprod).expand_as(x_start)
        return c.sqrt_alphas_cumprod * x_start, variance, torch.log(variance)

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        :param x_start: (N, C, ...) clean data x_0.
        :param t: (N,) long timestep indices.
        :param noise: optional eps of x_start's shape; standard normal when None.
        :return: (N, C, ...) x_t.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        c = self.coefficients(t, x_start)
        return c.sqrt_alphas_cumprod * x_start + c.sqrt_one_minus_alphas_cumprod * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0).

        :param x_start: (N, C, ...) x_0 (true or predicted).
        :param x_t: (N, C, ...) noised sample at step t.
        :param t: (N,) long timestep indices.
        :return: (mean, variance, log_variance_clipped), each of x_t's shape.
        """
        return self._q_posterior(x_start, x_t, self.coefficients(t, x_t))

    def _q_posterior(self, x_start, x_t, c: Coefficients):
        """q_posterior_mean_variance with the coefficients already gathered."""
        mean = c.posterior_mean_coef1 * x_start + c.posterior_mean_coef2 * x_t
        return (mean, c.posterior_variance.expand_as(x_t), c.posterior_log_variance_clipped.expand_as(x_t))

    # ----------------------------------------------------------------------------- reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=False, model_kwargs=None):
        """Run the network and turn its output into p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: callable model(x_t, t, **model_kwargs) -> (N, C or 2C, ...).
        :param x: (N, C, ...) x_t.
        :param t: (N,) long timestep indices (of this, possibly respaced, process).
        :param clip_denoised: clamp the predicted x_0 to [-1, 1] (pixel data; leave False for latents).
        :param model_kwargs: extra keyword arguments for the model, e.g. dict(y=labels, cfg_scale=4.0).
        :return: dict with "mean", "variance", "log_variance", "pred_xstart", each (N, C, ...).
        """
        mean_out, var_out = self._call_model(model, x, t, model_kwargs)
        return self._p_from_output(mean_out, var_out, x, self.coefficients(t, x), clip_denoised)

    def _p_from_output(self, mean_out, var_out, x, c: Coefficients, clip_denoised):
        """p_mean_variance from an already computed network output."""
        if var_out is None:
            variance, log_variance = c.fixed_variance.expand_as(x), c.fixed_log_variance.expand_as(x)
        else:
            frac = (var_out + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_variance = frac * c.log_betas + (1 - frac) * c.posterior_log_variance_clipped
            variance = torch.exp(log_variance)
        if self.model_mean_type == "epsilon":
            pred_xstart = c.sqrt_recip_alphas_cumprod * x - c.sqrt_recipm1_alphas_cumprod * mean_out
        else:
            pred_xstart = mean_out
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = c.posterior_mean_coef1 * pred_xstart + c.posterior_mean_coef2 * x
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _predict_eps_from_xstart(self, x_t, pred_xstart, c: Coefficients):
        """Invert x_0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps for eps."""
        return (c.sqrt_recip_alphas_cumprod * x_t - pred_xstart) / c.sqrt_recipm1_alphas_cumprod

    # ----------------------------------------------------------------------------- losses

    def _vb_terms_bpd(self, mean_out, var_out, x_start, x_t, c: Coefficients, t, clip_denoised=False):
        """Per-sample VB term in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at t=0."""
        true_mean, _, true_log_variance = self._q_posterior(x_start, x_t, c)
        out = self._p_from_output(mean_out, var_out, x_t, c, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        kl = kl / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses at timesteps t.

        With the default loss_type "mse" and a learned variance this is Improved DDPM's hybrid loss:
        MSE between the true and the predicted eps (or x_0) plus the VB term in bits computed with the
        predicted mean detached, so that the VB term trains only the variance channels.

        :param model: callable model(x_t, t, **model_kwargs) -> (N, C or 2C, ...).
        :param x_start: (N, C, ...) clean data x_0.
        :param t: (N,) long timestep indices.
        :param model_kwargs: extra keyword arguments for the model, e.g. dict(y=labels).
        :param noise: optional eps of x_start's shape; standard normal when None.
        :return: dict of (N,) tensors: "loss" (what to minimise), "mse" and "vb" (zeros when the
            variance is fixed and the loss is an MSE). For the mse losses loss = mse + vb (vb already
            rescaled for "rescaled_mse"); for the kl losses loss = vb (times T for "rescaled_kl") and
            mse is reported detached.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        c = self.coefficients(t, x_start)
        x_t = c.sqrt_alphas_cumprod * x_start + c.sqrt_one_minus_alphas_cumprod * noise
        mean_out, var_out = self._call_model(model, x_t, t, model_kwargs)
        target = noise if self.model_mean_type == "epsilon" else x_start
        mse = mean_flat((target - mean_out) ** 2)

        if self.loss_type in ("kl", "rescaled_kl"):
            vb = self._vb_terms_bpd(mean_out, var_out, x_start, x_t, c, t)
            loss = vb * self.num_timesteps if self.loss_type == "rescaled_kl" else vb
            return {"loss": loss, "mse": mse.detach(), "vb": vb}

        if var_out is None:
            vb = torch.zeros_like(mse)
        else:
            vb = self._vb_terms_bpd(mean_out.detach(), var_out, x_start, x_t, c, t)
            if self.loss_type == "rescaled_mse":
                # Keeps the VB term's weight independent of T, as Improved DDPM's L_hybrid with T = 1000.
                vb = vb * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ----------------------------------------------------------------------------- likelihood

    def prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) per sample, in bits per dimension: the bound's prior term.

        :param x_start: (N, C, ...) clean data x_0.
        :return: (N,) tensor.
        """
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    @torch.no_grad()
    def vb_terms_bpd(self, model, x_start, t, noise=None, model_kwargs=None, clip_denoised=False):
        """The bound's term at each sample's timestep t, in bits per dimension: KL(q(x_{t-1} | x_t, x_0) ||
        p(x_{t-1} | x_t)) for t > 0 and the discretised decoder's -log p(x_0 | x_1) at t = 0.

        :param model: callable model(x_t, t, **model_kwargs) -> (N, C or 2C, ...).
        :param x_start: (N, C, ...) data on the 256 levels of [-1, 1] (the decoder's bins).
        :param t: (N,) long timestep indices.
        :param noise: optional eps for x_t; standard normal when None.
        :param clip_denoised: clamp the predicted x_0 to [-1, 1] before the posterior mean (the official
            calc_bpd_loop's default, for pixels); a tuple of settings gets each from the one network call.
        :return: (N,) tensor, or (len(clip_denoised), N) for a tuple of settings.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        c = self.coefficients(t, x_start)
        x_t = c.sqrt_alphas_cumprod * x_start + c.sqrt_one_minus_alphas_cumprod * noise
        mean_out, var_out = self._call_model(model, x_t, t, model_kwargs)
        if isinstance(clip_denoised, tuple):
            return torch.stack([self._vb_terms_bpd(mean_out, var_out, x_start, x_t, c, t, clip)
                                for clip in clip_denoised])
        return self._vb_terms_bpd(mean_out, var_out, x_start, x_t, c, t, clip_denoised)

    @torch.no_grad()
    def calc_bpd_loop(self, model, x_start, model_kwargs=None, timesteps=None, generator=None,
                      clip_denoised=False):
        """The variational bound on -log p(x_0) in bits per dimension: prior + sum over t of the VB terms.

        With timesteps=None every term is computed (num_timesteps network calls per batch). Otherwise
        `timesteps` is a sorted list of K indices, one from each of K strata [s_k, s_{k+1}) that split
        1..T-1 (t = 0, the decoder, is always computed exactly): each stratum's sum is estimated as its
        size times its one term, an estimate of the bound that is unbiased when each index is drawn
        uniformly from its stratum (see bound_strata). An index may be an (N,) tensor, one per sample.
        The official calc_bpd_loop clips by default; here clip_denoised=False is the default.

        :param model: callable model(x_t, t, **model_kwargs) -> (N, C or 2C, ...).
        :param x_start: (N, C, ...) data on the 256 levels of [-1, 1].
        :param model_kwargs: extra keyword arguments for the model, e.g. dict(y=labels).
        :param timesteps: None, or the (strata, drawn index) pairs of bound_strata.
        :param generator: torch.Generator for the noise of each term (None: the global one).
        :param clip_denoised: as for vb_terms_bpd; a tuple of settings adds a leading dimension to every
            returned tensor.
        :return: dict of (N,) tensors: "total_bpd", "prior_bpd", "decoder_bpd" (t = 0) and
            "vb_bpd" (the terms over t > 0, summed or estimated).
        """
        n = x_start.shape[0]

        def term(t_index):
            t = torch.as_tensor(t_index, dtype=torch.long).expand(n).to(x_start.device)
            noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype).to(x_start.device)
            return self.vb_terms_bpd(model, x_start, t, noise=noise, model_kwargs=model_kwargs,
                                     clip_denoised=clip_denoised)

        decoder = term(0)
        if timesteps is None:
            strata = [((t, t + 1), t) for t in range(1, self.num_timesteps)]
        else:
            strata = timesteps
        vb = torch.zeros(decoder.shape, dtype=torch.float64, device=x_start.device)
        for (low, high), t_index in strata:
            vb += (high - low) * term(t_index).double()
        prior = self.prior_bpd(x_start).expand(decoder.shape)
        total = prior.double() + decoder.double() + vb
        return {"total_bpd": total, "prior_bpd": prior, "decoder_bpd": decoder, "vb_bpd": vb}

    def bound_strata(self, count, generator=None, exact=10, size=None, spacing="uniform"):
        """Strata for calc_bpd_loop's unbiased estimate of the bound: [((low, high), t), ...].

        Timesteps 1..exact are their own strata (their terms are the largest and vary fastest with t);
        `count` strata split the rest evenly ("uniform") or with geometrically growing widths
        ("geometric": narrow where the terms are large and change fast, so a far smaller variance for
        the same count; rounding may merge a few), each with one index drawn uniformly from it, or with
        size=N an (N,) tensor of indices drawn independently for each of N samples."""
        exact = min(exact, self.num_timesteps - 1)
        strata = [((t, t + 1), t) for t in range(1, exact + 1)]
        rest = self.num_timesteps - 1 - exact
        if spacing not in ("uniform", "geometric"):
            raise ValueError(f"unknown spacing {spacing!r}; choose uniform or geometric")
        space = np.linspace if spacing == "uniform" else np.geomspace
        edges = space(exact + 1, self.num_timesteps, min(count, rest) + 1).round().astype(int)
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            if high > low:
                pick = torch.randint(int(low), int(high), (1 if size is None else size,), generator=generator)
                strata.append(((int(low), int(high)), int(pick) if size is None else pick))
        return strata

    # ----------------------------------------------------------------------------- samplers

    def p_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, generator=None):
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise is added where t == 0.

        :param model: callable model(x_t, t, **model_kwargs) -> (N, C or 2C, ...).
        :param x: (N, C, ...) x_t.
        :param t: (N,) long timestep indices (of this, possibly respaced, process).
        :param clip_denoised: clamp the predicted x_0 to [-1, 1] (pixel data only).
        :param model_kwargs: extra keyword arguments for the model.
        :param generator: optional torch.Generator for the noise draw (on x's device or the CPU).
        :return: dict with "sample" (x_{t-1}) and "pred_xstart".
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        noise = _randn(x.shape, x.device, x.dtype, generator)
        nonzero = (t != 0).to(x.dtype).view(-1, *(1,) * (x.ndim - 1))  # (N, 1, ..., 1)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=False, model_kwargs=None, eta=0.0, generator=None):
        """One DDIM step x_t -> x_{t-1}; deterministic for eta = 0, DDPM-like for eta = 1.

        :param model, x, t, clip_denoised, model_kwargs: as for p_sample.
        :param eta: scale of the fresh noise (0 draws none).
        :param generator: optional torch.Generator for the noise draw (on x's device or the CPU).
        :return: dict with "sample" (x_{t-1}) and "pred_xstart".
        """
        c = self.coefficients(t, x)
        out = self._p_from_output(*self._call_model(model, x, t, model_kwargs), x, c, clip_denoised)
        # eps is recomputed from the (possibly clipped) x_0 so that the two stay consistent.
        eps = self._predict_eps_from_xstart(x, out["pred_xstart"], c)
        sigma = eta * c.ddim_sigma_unit
        direction = torch.sqrt((1.0 - c.alphas_cumprod_prev - sigma**2).clamp(min=0.0))
        sample = c.sqrt_alphas_cumprod_prev * out["pred_xstart"] + direction * eps
        if eta != 0:
            # sigma is exactly 0 at t = 0 (alpha_bar_prev = 1), so no noise is added there.
            sample = sample + sigma * _randn(x.shape, x.device, x.dtype, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                                  device=None, progress=False, generator=None):
        """Ancestral sampling from x_T ~ N(0, I) down to x_0, yielding after every step.

        :param model: callable model(x_t, t, **model_kwargs), e.g. a DiT or its forward_with_cfg.
        :param shape: shape of the batch to draw, (N, C, H, W).
        :param noise: optional x_T of that shape; drawn from `generator` when None.
        :param clip_denoised: clamp predicted x_0 to [-1, 1] (pixel data only).
        :param model_kwargs: extra keyword arguments for the model, e.g. dict(y=y, cfg_scale=4.0).
        :param device: where to sample; default: noise's device, else the model's, else the CPU.
        :param progress: show a tqdm progress bar.
        :param generator: optional torch.Generator used for every random draw (x_T and each step's noise),
            so that a seed reproduces the samples. It must live on `device` or on the CPU.
        :return: a generator of dicts with "sample" (x_{t-1}) and "pred_xstart", one per step.
        """
        yield from self._loop(self.p_sample, {}, model, shape, noise, clip_denoised, model_kwargs,
                              device, progress, generator)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                      device=None, progress=False, generator=None):
        """Ancestral sampling; arguments as p_sample_loop_progressive. Returns the final (N, C, H, W) x_0."""
        steps = self.p_sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs, device,
                                               progress, generator)
        return deque(steps, maxlen=1)[0]["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                                     device=None, progress=False, generator=None, eta=0.0):
        """DDIM sampling, yielding after every step; arguments as p_sample_loop_progressive, plus eta
        (0.0: deterministic given x_T)."""
        yield from self._loop(self.ddim_sample, {"eta": eta}, model, shape, noise, clip_denoised,
                              model_kwargs, device, progress, generator)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, model_kwargs=None,
                         device=None, progress=False, generator=None, eta=0.0):
        """DDIM sampling; arguments as ddim_sample_loop_progressive. Returns the final (N, C, H, W) x_0."""
        steps = self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, model_kwargs, device,
                                                  progress, generator, eta)
        return deque(steps, maxlen=1)[0]["sample"]

    def _loop(self, step, step_kwargs, model, shape, noise, clip_denoised, model_kwargs, device, progress,
              generator):
        """Shared body of the sampling loops: step from T - 1 down to 0, yielding each step's output."""
        if device is None:
            device = noise.device if noise is not None else _model_device(model)
        x = noise.to(device) if noise is not None else _randn(tuple(shape), torch.device(device),
                                                               torch.float32, generator)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            # no_grad only around the step: a generator must not leave grad mode changed for its caller.
            with torch.no_grad():
                out = step(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                           generator=generator, **step_kwargs)
            yield out
            x = out["sample"]


def _randn(shape, device, dtype, generator):
    """Standard normal draw; a CPU generator also serves an accelerator (draw on CPU, then move)."""
    if generator is None or generator.device == device:
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)
    return torch.randn(shape, dtype=dtype, generator=generator, device=generator.device).to(device)


def _model_device(model):
    """Device of a module's (or a bound method's module's) first parameter, else the CPU."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if isinstance(module, torch.nn.Module):
        param = next(module.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")
