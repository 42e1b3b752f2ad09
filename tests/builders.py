"""Small checkpoints and a tiny VAE that tests build for themselves, and the benchmarks' scripts loaded as
modules (shared by several test files)."""

import importlib.util
from pathlib import Path

import torch

from ditnorm.checkpoint import FORMAT, read_checkpoint, save_checkpoint
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


def tiny_dit(norm="layernorm", seed=0):
    """A 2-block MnistDiT-XS/4 on 8x8 images (4 tokens, width 64) with every branch alive."""
    torch.manual_seed(seed)
    model = build_model("MnistDiT-XS/4", input_size=8, depth=2, norm=norm)
    return randomize(model, seed=seed, std=0.05).eval()


def levels(n, seed=0):
    """n random 8x8 images on the 256 levels of [-1, 1], about half their pixels background (-1)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 1, 8, 8), generator=g) * (torch.rand(n, 1, 8, 8, generator=g) < 0.5)
    return pixels / 127.5 - 1


def perturb_zero_init(model, seed=0, std=0.02):
    """adaLN-Zero makes a fresh DiT output exactly 0: move every weight a little off its initial value."""
    return randomize(model, seed, std=std, add=True)


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


def make_diffusers_dit(path=None, seed=0, norm_eps=1e-6, num_layers=2, **config):
    """A tiny random DiTTransformer2DModel (4x4x4 latents, patch 2, 32 wide, 10 classes) whose per-block
    timestep/class embedder copies agree, as in a converted checkpoint; saved with save_pretrained if path."""
    from diffusers import DiTTransformer2DModel

    config = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, sample_size=4,
                  patch_size=2, num_embeds_ada_norm=10, norm_eps=norm_eps, num_layers=num_layers, **config)
    model = randomize(DiTTransformer2DModel(**config), seed, std=0.3)
    embedder = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(embedder)
    if path is not None:
        model.save_pretrained(path)
    return model.eval()


def make_diffusers_transformers(root):
    """Tiny random DiT, PixArt, SD3 and Flux transformers saved under root; {family: folder}."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    common = dict(num_attention_heads=2, attention_head_dim=16)
    models = {
        "pixart": PixArtTransformer2DModel(in_channels=4, out_channels=8, num_layers=2, sample_size=4,
                                           patch_size=2, cross_attention_dim=32, caption_channels=24,
                                           **common),
        "sd3": SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                     joint_attention_dim=24, caption_projection_dim=32,
                                     pooled_projection_dim=12, pos_embed_max_size=8, **common),
        "flux": FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                       joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
                                       axes_dims_rope=(4, 6, 6), **common),
    }
    folders = {"dit": Path(root) / "dit"}
    make_diffusers_dit(folders["dit"])
    for i, (family, model) in enumerate(models.items(), start=1):
        folders[family] = Path(root) / family
        randomize(model, seed=i, std=0.1).save_pretrained(folders[family])
    return folders


def tensors_of(path):
    """model, ema and optimizer tensors of a checkpoint, flattened to one name -> tensor dict."""
    ckpt = read_checkpoint(path)
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    out.update({f"ema.{k}": v for k, v in ckpt["ema"].items()})
    for index, state in ckpt["opt"]["state"].items():
        out.update({f"opt.{index}.{k}": v for k, v in state.items()})
    for label, average in ckpt.get("averages", {}).items():
        out.update({f"averages.{label}.{k}": v for k, v in average["tensors"].items()})
    return out


def load_benchmark(name):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
