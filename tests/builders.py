"""Small checkpoints and a tiny VAE that tests build for themselves (shared by several test files)."""

from pathlib import Path

import torch

from checkpoint import FORMAT, save_checkpoint
from models import build_model


def randomize(model, seed=0, std=0.1, add=False):
    """Give every trainable parameter random values N(0, std^2) (add=True: add them), the adaLN-Zero zeros
    included, so that every branch of the network reaches its output; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * std
                p.add_(noise) if add else p.copy_(noise)
    return model


def perturb_zero_init(model, seed=0, std=0.02):
    """adaLN-Zero makes a fresh DiT output exactly 0: give the zero-initialised layers small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


def save_model(model, name, path, step=0, train_args=None):
    """Save a model in this repository's checkpoint format."""
    save_checkpoint({"format": FORMAT, "config": {"model": name, **model.config}, "model": model.state_dict(),
                     "ema": model.state_dict(), "step": step, "train_args": train_args or {}}, path)
    return Path(path)


def make_toy_runs(results_dir, model_name="ToyDiT-XS/1", steps=(10, 20)):
    """Run folders <results_dir>/000-<model>-<norm>/checkpoints/<step>.pt for both norms; {norm: run}."""
    runs = {}
    for i, norm in enumerate(("layernorm", "none")):
        run = Path(results_dir) / f"000-{model_name.replace('/', '-')}-{norm}"
        for k, step in enumerate(steps):
            model = perturb_zero_init(build_model(model_name, norm=norm), seed=10 * i + k)
            save_model(model, model_name, run / "checkpoints" / f"{step:07d}.pt", step)
        runs[norm] = run
    return runs


def make_latent_checkpoint(path, num_classes=1000):
    """A tiny latent DiT (4x4x4 latents, one 64-wide block) in our format."""
    model = build_model("DiT-S/2", input_size=4, depth=1, hidden_size=64, num_heads=2,
                        num_classes=num_classes)
    return save_model(perturb_zero_init(model), "DiT-S/2", path)


def make_vae(path):
    """A tiny AutoencoderKL with the SD VAE's 8x upsampling and 4 latent channels, via save_pretrained."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                        layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=32)
    vae.save_pretrained(path)
    return Path(path)
