"""What the toy models train on, and each step's timesteps and noise: all drawn from (seed, step, global
sample index), never from a per-rank stream (the trainer's docstring says why).
"""

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch

# zeros: every image is exactly 0 (the original study). constant: image i of step s is c * ones with
# c ~ U[CONSTANT_RANGE] drawn from (seed, step, i), so the network has to carry the data's scale too.
DATA_KINDS = ("zeros", "constant")
CONSTANT_RANGE = (-1.0, 1.0)


def step_seed(seed, step):
    """A 63-bit generator seed that depends on (seed, step) only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") >> 1


def rank_batches(seed, steps, global_batch, rank, world_size, num_timesteps, shape, device, chunk=100):
    """Yield this rank's (t, noise) for each step, sliced from the whole global batch drawn from (seed, step)
    on the CPU, `chunk` steps at a time, the next chunk drawn in a background thread (a GPU stays busy)."""
    local = global_batch // world_size

    def draw(start):  # (chunk, b) and (chunk, b, C, H, W)
        ts, noises = [], []
        for step in steps[start:start + chunk]:
            generator = torch.Generator().manual_seed(step_seed(seed, step))
            t = torch.randint(0, num_timesteps, (global_batch,), generator=generator)  # (B,)
            noise = torch.randn(global_batch, *shape, generator=generator)  # (B, C, H, W)
            ts.append(t[rank * local:(rank + 1) * local])
            noises.append(noise[rank * local:(rank + 1) * local])
        return torch.stack(ts), torch.stack(noises)

    with ThreadPoolExecutor(max_workers=1) as pool:
        starts = range(0, len(steps), chunk)
        pending = pool.submit(draw, starts[0]) if starts else None
        for start in starts:
            ts, noises = pending.result()
            if start + chunk < len(steps):
                pending = pool.submit(draw, start + chunk)
            yield from zip(ts.to(device), noises.to(device), strict=True)


def constant_images(seed, step, global_batch, rank, world_size, shape, device):
    """This rank's slice (b, C, H, W) of the global batch of constant images c * ones of (seed, step)."""
    # Its own stream (not the noise generator's), so adding it leaves the zeros runs' t and noise unchanged.
    generator = torch.Generator().manual_seed(step_seed(seed, f"{step}:constant"))
    low, high = CONSTANT_RANGE
    c = low + (high - low) * torch.rand(global_batch, generator=generator)  # (B,)
    local = global_batch // world_size
    c = c[rank * local:(rank + 1) * local].to(device)  # (b,)
    return c.view(-1, 1, 1, 1).expand(-1, *shape).contiguous()  # (b, C, H, W)


class ToyData:
    """The toys' training data of a data kind, with images.ImageData's batch(): one class (label 0), no
    class dropout."""

    def __init__(self, kind, model_config):
        self.kind, size = kind, model_config["input_size"]
        self.shape = (model_config["in_channels"], size, size)

    def batch(self, seed, step, global_batch, rank, world_size, device, drop_prob=0.0):
        """This rank's (x (b, C, H, W), y (b,), None) of training step `step`."""
        local = global_batch // world_size
        x = constant_images(seed, step, global_batch, rank, world_size, self.shape, device) \
            if self.kind == "constant" else torch.zeros(local, *self.shape, device=device)
        return x, torch.zeros(local, dtype=torch.long, device=device), None
