"""Gaussian diffusion for DiT: `from diffusion import create_diffusion`."""

from .gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps

__all__ = ["create_diffusion", "GaussianDiffusion", "SpacedDiffusion", "get_named_beta_schedule",
           "space_timesteps"]


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=1000) -> SpacedDiffusion:
    """Build the diffusion the DiT models use (defaults: the published DiT's training setup).

    :param timestep_respacing: which steps to keep: "" or None for all diffusion_steps (training),
        "250" for 250 evenly spaced steps (DiT's sampling), "10,20,30" for per-section counts,
        "ddim50" for the DDIM stride giving 50 steps.
    :param noise_schedule: "linear", or "cosine" / "squaredcos_cap_v2".
    :param use_kl: train on the variational bound alone (times T) instead of the hybrid loss.
    :param sigma_small: with a fixed variance, use beta_tilde_t instead of beta_t.
    :param predict_xstart: the network predicts x_0 instead of eps.
    :param learn_sigma: the network outputs 2C channels, the last C setting the variance ("learned range").
    :param rescale_learned_sigmas: weight the VB term by T / 1000 (only changes anything when T != 1000).
    :param diffusion_steps: T, the number of steps of the underlying process.
    :return: a SpacedDiffusion (a GaussianDiffusion) whose num_timesteps is the respaced count.
    :raises ValueError: for a bad respacing string or schedule name.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = "learned_range"
    else:
        model_var_type = "fixed_small" if sigma_small else "fixed_large"
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type="start_x" if predict_xstart else "epsilon",
        model_var_type=model_var_type,
        loss_type=loss_type,
    )
