"""Respacing: run a trained diffusion with a subset of its timesteps (fewer sampling steps)."""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Choose which of the original steps 0..num_timesteps-1 to keep.

    :param num_timesteps: T, the number of steps of the original process.
    :param section_counts: "ddimN": the integer stride of the DDIM paper that gives exactly N steps
        (range(0, T, stride)); otherwise comma-separated counts such as "250" or "10,20,30" (or a
        sequence of ints): T is cut into as many equal sections (the first T % len ones one step longer)
        and each section keeps that many evenly spaced steps, its first and last included.
    :return: the set of kept original step indices.
    :raises ValueError: for a malformed string or a count that does not fit.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                wanted = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}; write e.g. 'ddim50'") from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride gives exactly {wanted} of {num_timesteps} steps; "
                             "pick another N for 'ddimN' or use a plain count such as '250'")
        try:
            section_counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}; write a step count like '250', "
                             "per-section counts like '10,20,30', or 'ddim50'") from None
    section_counts = [int(n) for n in section_counts]
    if not section_counts:
        raise ValueError("respacing needs at least one section count")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"section {i} has {size} steps and cannot keep {count}; "
                             f"each count must be between 1 and {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept += [start + round(k * stride) for k in range(count)]
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion restricted to a subset of the steps of a base process.

    The kept alpha_bar values are those of the base process; the betas are rederived from them
    (beta'_k = 1 - alpha_bar[s_k] / alpha_bar[s_{k-1}]). Methods take respaced indices 0..len-1, and the
    network is still called with the ORIGINAL index s_k, which is what it was trained on.

    :param use_timesteps: the original step indices to keep (e.g. from space_timesteps).
    :param betas: (T,) betas of the base process.
    :param kwargs: model_mean_type, model_var_type, loss_type, as for GaussianDiffusion.
    """

    def __init__(self, use_timesteps, *, betas, **kwargs):
        base_alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        kept = sorted({int(s) for s in use_timesteps})
        if not kept or kept[0] < 0 or kept[-1] >= len(base_alphas_cumprod):
            raise ValueError(f"use_timesteps must be a non-empty set of indices in [0, {len(betas)})")
        kept_alphas_cumprod = base_alphas_cumprod[kept]
        new_betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        super().__init__(betas=new_betas, **kwargs)
        self.original_num_steps = len(base_alphas_cumprod)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)  # respaced index -> original index
        self._maps = {}  # device -> timestep_map there

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map respaced indices to the original ones the network was trained with."""
        timestep_map = self._maps.get(t.device)
        if timestep_map is None:
            timestep_map = self._maps[t.device] = self.timestep_map.to(t.device)
        return timestep_map[t]
