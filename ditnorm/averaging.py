"""Averages of the training weights beside the raw weights and DiT's EMA, at no extra training cost: the
classic EMA (`ema_<decay>`), EDM2's power-function EMA (`power_<sigma_rel>`, Karras et al. 2024) and an EMA
of each tensor's direction rescaled to the raw norm (`sphere_<decay>`), since averaging scale-invariant
weights whose norms drift is not averaging the function. update_ema and all_reduce_mean serve every step."""

import math

import numpy as np
import torch
import torch.distributed as dist

# The study's set, recorded in every training run: short to long EMAs, two power EMAs, one sphere EMA.
DEFAULT_AVERAGES = ("ema_0.999", "ema_0.9995", "power_0.05", "power_0.10", "sphere_0.9999")
KINDS = ("ema", "power", "sphere")


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """The DiT EMA: ema <- decay * ema + (1 - decay) * param, for whole parameter lists at once."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def all_reduce_mean(grads, world_size):
    """Average gradients over ranks with one collective on one flattened buffer (gloo has no AVG)."""
    flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size)
    torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(flat.split([g.numel() for g in grads]), grads,
                                                              strict=True)])


def parse_label(label: str) -> tuple[str, float]:
    """'ema_0.999' -> ("ema", 0.999); ValueError with the accepted forms otherwise."""
    kind, _, value = label.partition("_")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if kind not in KINDS or not 0 < number < 1:
        raise ValueError(f"unknown average {label!r}; use ema_<decay>, power_<sigma_rel> or sphere_<decay> "
                         "with a value in (0, 1), e.g. ema_0.999, power_0.05, sphere_0.9999")
    return kind, number


def power_gamma(sigma_rel: float) -> float:
    """EDM2's power-EMA exponent gamma of relative width sigma_rel: the largest real root of
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))."""
    inv = 1.0 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1]
    if not real:
        raise ValueError(f"sigma_rel {sigma_rel} is too wide for a power-function EMA (gamma > -1)")
    return max(real)


def _unit(tensors):
    """Each tensor divided by its norm (a zero tensor stays zero)."""
    norms = torch._foreach_norm(tensors)
    return torch._foreach_div(tensors, [n.clamp_min(1e-30) for n in norms])


class WeightAverages:
    """Several running averages of a model's parameters, updated after every optimizer step."""

    def __init__(self, model, labels=DEFAULT_AVERAGES):
        self.names = [name for name, _ in model.named_parameters()]
        self.params = list(model.parameters())
        self.labels = list(dict.fromkeys(labels))
        self.kinds = {label: parse_label(label) for label in self.labels}
        self.gammas = {label: power_gamma(v) for label, (k, v) in self.kinds.items() if k == "power"}
        with torch.no_grad():
            raw = [p.detach() for p in self.params]
            self.tensors = {label: (_unit(raw) if kind == "sphere" else [p.clone() for p in raw])
                            for label, (kind, _) in self.kinds.items()}

    @torch.no_grad()
    def update(self, step: int):
        """Fold in the current weights as those after optimizer step `step` (1 for the first)."""
        raw = [p.detach() for p in self.params]
        unit = None
        for label, (kind, value) in self.kinds.items():
            if kind == "ema":
                weight = 1.0 - value
            elif kind == "power":
                weight = 1.0 - (1.0 - 1.0 / step) ** (self.gammas[label] + 1)
            else:
                weight = 1.0 - value
                unit = unit if unit is not None else _unit(raw)
            torch._foreach_lerp_(self.tensors[label], unit if kind == "sphere" else raw, weight)

    def state_dict(self):
        """Plain data for a checkpoint: {label: {"kind", "value", "tensors": {name: tensor}}}."""
        def named(tensors):
            return {n: t.clone() for n, t in zip(self.names, tensors, strict=True)}

        return {label: {"kind": kind, "value": value, "tensors": named(self.tensors[label])}
                for label, (kind, value) in self.kinds.items()}

    def load_state_dict(self, state):
        """Restore the averages of a checkpoint; a label it lacks raises KeyError naming it."""
        for label in self.labels:
            saved = state[label]["tensors"]
            for name, tensor in zip(self.names, self.tensors[label], strict=True):
                tensor.copy_(saved[name])


def read_out(average: dict, raw_state: dict) -> dict:
    """The state dict of one saved average; a sphere average takes each tensor's norm from raw_state."""
    tensors = average["tensors"]
    if average["kind"] != "sphere":
        return {**raw_state, **tensors}
    out = dict(raw_state)
    for name, direction in tensors.items():
        norm = direction.norm()
        scale = raw_state[name].norm() / norm if norm > 0 else torch.zeros(())
        out[name] = direction * scale
    return out
