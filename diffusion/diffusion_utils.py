"""Log-likelihood helpers for the variational bound: Gaussian KL and the discretised decoder."""

import math

import torch

# Half the width of one of the 256 bins that [-1, 1] is cut into (the bins are 2/255 wide).
HALF_BIN = 1.0 / 255.0
# Below this probability a log would be -inf; the bound only needs to be finite.
_MIN_PROB = 1e-12
_SQRT_HALF = math.sqrt(0.5)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the first (batch) one."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other; any of them may be a tensor or a Python float.
    """
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    # exp needs tensors; a float goes straight to the tensors' dtype (via float32 it would lose digits).
    logvar1, logvar2 = (torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device)
                        for v in (logvar1, logvar2))
    # (logvar2 - logvar1) grouped so that identical Gaussians give exactly 0.
    return 0.5 * (-1.0 + (logvar2 - logvar1) + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of data x in [-1, 1], quantised to 256 levels, under N(means, exp(log_scales)²).

    Each level k owns the bin [c_k - 1/255, c_k + 1/255] around its centre c_k = -1 + 2k/255, except
    that the outermost bins are open-ended ((-inf, -1 + 1/255] and [1 - 1/255, inf)) so that the 256
    probabilities sum to one. x must hold bin centres (e.g. 8-bit pixels mapped to [-1, 1]).

    :param x: (N, ...) data.
    :param means: the Gaussian means, broadcastable to x.
    :param log_scales: the log standard deviations, broadcastable to x.
    :return: (N, ...) elementwise log-probabilities.
    """
    centred = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centred + HALF_BIN)  # standardised upper edge of x's bin
    lower = inv_std * (centred - HALF_BIN)  # standardised lower edge
    # log_ndtr keeps the open-ended tails accurate far from the mean, where 1 - cdf would round to 0.
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    # P(lower < z < upper) = (erfc(a) - erfc(b)) / 2 with (a, b) = (lower, upper) / sqrt(2), mirrored to
    # (-upper, -lower) on the left of the mean: a difference of two CDFs near 1 would cancel.
    right = lower > 0
    a = torch.where(right, lower, -upper) * _SQRT_HALF
    b = torch.where(right, upper, -lower) * _SQRT_HALF
    prob_inside = (0.5 * (torch.special.erfc(a) - torch.special.erfc(b))).clamp(min=_MIN_PROB)
    return torch.where(
        x < -0.999,
        log_cdf_upper,
        torch.where(x > 0.999, log_survival_lower, torch.log(prob_inside)),
    )
