"""Sample a trained DiT: toy models to error statistics, image models (pixels or latents) to a grid.

Toy checkpoints (ToyDiT, 2x2x2 images): N seeded samples saved as .npz and their error printed: |x| for a
model trained on zeros, |x - mean(x)| (the distance to the nearest constant image) for one trained with
--data constant, whose sample means should follow U[-1, 1] (their Kolmogorov-Smirnov distance is printed).

    python sample.py --ckpt results/reproduce/zeros-none-seed0 --scatter toy.png
    python sample.py --ckpt results/reproduce/zeros-none-seed0 --step 1000 --weights raw --num-samples 1000

Image models, guided (--cfg-scale; 1 turns it off), saved as a grid PNG as the official sample.py saves
it, the samples (in [-1, 1]) beside it as .npz. Pixel-space DiTs (train.py): a row per class
(--class-labels; default every class, at most 16), --per-class samples in each. Latent DiTs (the official
DiT-XL/2 by name, downloaded on first use, or a path): --num-samples images decoded by the SD VAE.

    python sample.py --ckpt results/mnist/MnistDiT-XS-4-layernorm-seed0 --cfg-scale 1 --out ln.png
    python sample.py --ckpt DiT-XL-2-256x256.pt --class-labels 207 360 387 974 --num-sampling-steps 50

--ckpt takes a checkpoint file or a run folder (its last checkpoint, or the one at --step); --weights raw
samples the training weights instead of their EMA.
"""

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ditnorm import layout
from ditnorm.checkpoint import (
    OFFICIAL_CHECKPOINTS,
    CheckpointError,
    DownloadError,
    diffusion_of,
    load_for_sampling,
    read_checkpoint,
)
from ditnorm.data import CONSTANT_RANGE
from ditnorm.images import write_grid
from ditnorm.options import (
    Parser,
    add_fast_flag,
    check_device,
    check_output_file,
    device,
    finite_float,
    positive_int,
    seed,
)
from fast import sample_toy
from models import NORM_KINDS, TOY_MODELS

VAE_SCALE = 0.18215  # latents were scaled by this factor for training (Stable Diffusion's constant)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_CFG_SCALE = 4.0
DEFAULT_STEPS = 250  # image models (as DiT); toy models: every step of the checkpoint's diffusion
DEFAULT_PER_CLASS = 8
PIXEL_CHANNELS = (1, 3)  # grey or RGB images (train.py); 4 channels are the SD VAE's latents
MAX_DEFAULT_ROWS = 16  # a pixel grid's rows when --class-labels is not given: every class, up to this many


class SampleError(Exception):
    """A request that cannot be sampled; the message says what to do."""


def guided_model(model, cfg_scale, cfg_channels):
    """The model callable for the sampler: model.forward_with_cfg on the official 3 channels, or "all" of
    the noise channels."""
    guided = None if cfg_channels == "all" else 3
    return lambda x, t, y: model.forward_with_cfg(x, t, y, cfg_scale, guided_channels=guided)


def load_vae(name_or_path, device):
    """diffusers AutoencoderKL from a local folder or a Hugging Face name; SampleError if it cannot load."""
    from diffusers.models import AutoencoderKL

    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise SampleError(f"VAE folder {name_or_path} not found; pass a folder written by save_pretrained "
                          "with --vae")
    try:
        return AutoencoderKL.from_pretrained(str(Path(name_or_path).expanduser()) if looks_local
                                             else name_or_path).to(device).eval()
    except Exception as e:  # diffusers raises OSError, ValueError, HTTP errors ... all mean "cannot load"
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise SampleError(f"cannot load the VAE {name_or_path!r} ({first}); "
                          "pass a local folder with --vae") from e


def check_labels(labels, num_classes):
    """SampleError when a class label is outside [0, num_classes)."""
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise SampleError(f"class labels {bad} out of range; this model has classes 0..{num_classes - 1}")


@torch.no_grad()
def sample_toy_checkpoint(model, config, train_args, args):
    """Toy path: samples -> .npz, printed error statistics, optional scatter png."""
    if args.vae is not None or args.image_size is not None or args.cfg_scale is not None:
        raise SampleError(f"{args.ckpt} is a toy {config['model']} checkpoint (2x2x2 data, no VAE, "
                          "no guidance); drop --vae, --image-size and --cfg-scale")
    check_labels(args.class_labels or [], config["num_classes"])
    num_samples = args.num_samples or 100
    diffusion = diffusion_of(train_args, args.num_sampling_steps)
    steps = diffusion.num_timesteps
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(1)  # 4-token batches: thread hand-offs cost more than they save
    samples = sample_toy(model, diffusion, num_samples, generator=generator, device=args.device,
                         fast=args.fast, log=print, progress=True)
    samples = samples.double().cpu().numpy()  # (N, C, H, W)

    from ditnorm import analysis  # matplotlib is only needed here

    data = train_args.get("data", "zeros")  # the data it was trained on; checkpoints without: zeros runs
    errors = analysis.pixel_errors(samples)
    if data == "constant":
        label, stats = "|x - mean(x)|", analysis.error_stats(errors["dev_const"])
        stats["ks_c"] = analysis.ks_uniform(samples.reshape(len(samples), -1).mean(1), *CONSTANT_RANGE)
    else:
        label, stats = "|x|", analysis.error_stats(errors["abs_x"])
    weights = "" if args.weights == "ema" else f"-{args.weights}"
    name = f"{Path(args.ckpt).stem}-{config['norm']}{weights}-seed{args.seed}.npz"
    out = Path(args.out or layout.SAMPLES / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, samples=samples, seed=args.seed, ckpt=str(args.ckpt), num_sampling_steps=steps, data=data,
             error=label, **stats)
    print(f"{config['model']} norm={config['norm']} ({data} data), {args.weights} weights: {num_samples} "
          f"samples, {steps} steps, seed {args.seed}")
    print(f"{label} mean {stats['mean']:.3e}  median {stats['median']:.3e}  max {stats['max']:.3e}"
          + (f"  ({stats['nonfinite']} non-finite values left out)" if stats["nonfinite"] else ""))
    if data == "constant":
        print(f"sample means vs U{list(CONSTANT_RANGE)}: Kolmogorov-Smirnov distance {stats['ks_c']:.3f}")
    print(f"saved {out}")
    if args.scatter:
        title = f"{layout.run_name(args.ckpt)}, {args.weights} weights, {steps} sampling steps"
        fig = analysis.plot_toy_scatter({f"norm={config['norm']}": samples}, title=title)
        Path(args.scatter).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.scatter, dpi=150)
        print(f"saved {args.scatter}")


@torch.no_grad()
def sample_image_checkpoint(model, config, train_args, args, latent):
    """Image path: guided samples (latents decoded by the VAE) -> a grid png and the samples as .npz.
    Pixel models: a row per class, --per-class samples in each; latent models: --num-samples images."""
    if latent and (args.scatter or args.per_class is not None):
        raise SampleError("--scatter plots toy samples and --per-class sets a pixel-space grid's columns; "
                          "drop them for a latent model (--num-samples sets its images)")
    if not latent and (args.vae is not None or args.scatter or args.num_samples is not None):
        raise SampleError(f"{args.ckpt} is a pixel-space model (no VAE, no scatter): drop --vae, --scatter "
                          "and --num-samples; --per-class sets the samples of each class")
    size = config["input_size"]
    shown = size * 8 if latent else size  # the SD VAE decodes each latent pixel to 8x8
    if args.image_size is not None and args.image_size != shown:
        raise SampleError(f"{args.ckpt} generates {shown}x{shown} images; pass --image-size {shown} or "
                          "another checkpoint")
    rows = args.class_labels or list(range(min(config["num_classes"], MAX_DEFAULT_ROWS)))
    check_labels(rows, config["num_classes"])
    cfg_scale = DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    if cfg_scale != 1.0 and config["class_dropout_prob"] == 0:
        raise SampleError(f"{args.ckpt} was trained without class dropout (no null class); use --cfg-scale 1")
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    if not latent:  # a row per class
        labels = [label for label in rows for _ in range(args.per_class or DEFAULT_PER_CLASS)]
    elif args.class_labels:  # the labels, repeated to --num-samples
        labels = [rows[i % len(rows)] for i in range(args.num_samples or len(rows))]
    else:  # random labels
        labels = torch.randint(0, config["num_classes"], (args.num_samples or 8,), generator=g,
                               device=args.device).tolist()
    per_row = math.ceil(math.sqrt(len(labels))) if latent else args.per_class or DEFAULT_PER_CLASS
    steps = args.num_sampling_steps or DEFAULT_STEPS
    diffusion = diffusion_of(train_args, steps)
    vae = load_vae(args.vae or DEFAULT_VAE, args.device) if latent else None  # before sampling: fail fast
    name = f"{layout.run_name(args.ckpt)}-cfg{cfg_scale:g}-seed{args.seed}.png"
    out = Path(args.out or layout.SAMPLES / name)
    if out.suffix.lower() != ".png":
        raise SampleError(f"--out {out} names the grid, a .png (the samples go beside it as .npz); pass a "
                          ".png")
    n, c = len(labels), config["in_channels"]
    x = torch.randn(n, c, size, size, generator=g, device=args.device)  # (N, C, h, w)
    y = torch.tensor(labels, device=args.device)  # (N,)
    fn = model
    if cfg_scale != 1.0:
        # Conditional and unconditional halves share the noise; the null label is the extra row num_classes.
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, config["num_classes"])])
        fn = guided_model(model, cfg_scale, args.cfg_channels if latent else "all")
    images = diffusion.p_sample_loop(fn, x.shape, noise=x, clip_denoised=not latent, model_kwargs={"y": y},
                                     device=args.device, progress=True, generator=g)[:n]  # the guided half
    if latent:
        images = vae.decode(images / VAE_SCALE).sample  # (N, 3, H, W) in about [-1, 1]
    npz = write_grid(out, images, per_row, labels=np.array(labels), seed=args.seed, cfg_scale=cfg_scale,
                     num_sampling_steps=steps, ckpt=str(args.ckpt), weights=args.weights)
    what = (f"{len(rows)} classes x {per_row} samples" if not latent else f"{n} samples") + " of " + \
        "x".join(map(str, images.shape[1:]))
    print(f"{config['model']} norm={config['norm']}, {args.weights} weights: {what}, labels "
          f"{labels if latent else rows}, cfg {cfg_scale:g}"
          + (f" ({args.cfg_channels} channels)" if latent else "") + f", {steps} steps, seed {args.seed}")
    print(f"saved {out} and {npz}")


def resolve_checkpoint(args):
    """The checkpoint file to load: --ckpt itself, or a run folder's checkpoint at --step (default: its last).

    --weights raw needs a file that holds both weights; the published official checkpoints are EMA only."""
    path = Path(args.ckpt)
    if path.is_dir():
        folder = path if (path / layout.CHECKPOINTS).is_dir() else path.parent
        if not (folder / layout.CHECKPOINTS).is_dir():
            raise SampleError(f"{args.ckpt} is a folder without checkpoints/<step>.pt; pass a run folder of "
                              "train_toy.py or train.py, or a checkpoint file")
        path = layout.checkpoint_at(folder, args.step)
    elif args.step is not None:
        raise SampleError("--step picks a checkpoint of a run folder; drop it or pass the run folder as "
                          "--ckpt")
    if args.weights == "raw":
        checkpoint = read_checkpoint(path) if path.is_file() else {}
        if not (isinstance(checkpoint.get("model"), dict) and checkpoint.get("ema") is not None):
            raise SampleError(f"{args.ckpt} holds one set of weights only (the published official ones are "
                              "the EMA); drop --weights raw or pass a training checkpoint")
    return path


def build_parser():
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(prog="sample.py", description=summary, epilog="details and examples:\n" + details)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint file, run folder of train_toy.py or train.py, or an official name "
                   f"(downloaded): {', '.join(OFFICIAL_CHECKPOINTS)}")
    p.add_argument("--step", type=positive_int, default=None,
                   help="with a run folder as --ckpt: the checkpoint step (default: the run's last)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the EMA weights (what DiT samples with) or the raw training weights")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="default: 100 for toy models; the number of --class-labels (or 8) for latent models")
    p.add_argument("--per-class", type=positive_int, default=None,
                   help=f"pixel-space models: samples of each class, the grid's columns (default: "
                        f"{DEFAULT_PER_CLASS})")
    p.add_argument("--seed", type=seed, default=0, help="seed of the noise and of random labels")
    p.add_argument("--num-sampling-steps", type=positive_int, default=None,
                   help=f"respaced steps of the checkpoint's own diffusion (at most its length); default "
                        f"{DEFAULT_STEPS} for image models (as DiT), all of them for toy models")
    p.add_argument("--cfg-scale", type=finite_float, default=None,
                   help=f"guidance scale of image models (default {DEFAULT_CFG_SCALE}); 1 disables it")
    p.add_argument("--cfg-channels", choices=("all", "3"), default="3",
                   help="latent models: guide the first 3 output channels as the official DiT sample.py "
                        "does (default), or all eps channels (pixel models: always their eps channels)")
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="latent models: labels, repeated to --num-samples (default: random labels drawn from "
                        f"--seed); pixel models: the grid's rows (default: every class, at most "
                        f"{MAX_DEFAULT_ROWS})")
    p.add_argument("--vae", default=None,
                   help=f"AutoencoderKL: a Hugging Face name ({DEFAULT_VAE} or stabilityai/sd-vae-ft-mse) "
                        "or a local folder (default: the -ema one)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="checked against the checkpoint (default: taken from it)")
    add_fast_flag(p)
    p.add_argument("--norm", choices=NORM_KINDS, default=None,
                   help="checked against the checkpoint; needed only for a plain state dict of no "
                        "official DiT architecture (a toy model's state_dict()): it does not store its norm")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda falls back to cpu when no GPU is present")
    p.add_argument("--out", default=None,
                   help="output .npz (toy) or .png grid (image models; their samples go beside it as .npz); "
                        "default under results/samples/")
    p.add_argument("--scatter", default=None, help="toy only: also save the 2-D pixel scatter png here")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; sampling on cpu", file=sys.stderr)
        args.device = "cpu"
    if check_device(args.device):
        parser.error(f"--device {args.device}: {check_device(args.device)}")
    for flag, path in (("--out", args.out), ("--scatter", args.scatter)):
        if path is not None and check_output_file(path):
            parser.error(f"{flag} {path}: {check_output_file(path)}")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    try:
        args.ckpt = str(resolve_checkpoint(args))
        # The steps and schedule of the diffusion come from the checkpoint (diffusion_of), never a default.
        model, config, train_args = load_for_sampling(args.ckpt, norm=args.norm, device=args.device,
                                                      use_ema=args.weights == "ema")
        bad = [name for name, value in model.state_dict().items()
               if value.is_floating_point() and not torch.isfinite(value).all()]
        if config["model"] in TOY_MODELS:  # a diverged toy is sampled: its non-finite values are counted
            sample_toy_checkpoint(model, config, train_args, args)
        elif bad:
            raise SampleError(f"{args.ckpt} holds non-finite {args.weights} weights ({', '.join(bad[:2])}"
                              f"{' ...' if len(bad) > 2 else ''}: a diverged run); pass an earlier "
                              "checkpoint")
        elif config["in_channels"] in (*PIXEL_CHANNELS, 4):
            sample_image_checkpoint(model, config, train_args, args, latent=config["in_channels"] == 4)
        else:
            raise SampleError(f"{args.ckpt} has {config['in_channels']} input channels: neither pixels "
                              "(1 or 3) nor the SD VAE's 4 latent channels; pass another checkpoint")
    except DownloadError as e:
        parser.fail(str(e))
    except (CheckpointError, SampleError, FileNotFoundError) as e:
        parser.error(str(e))
    except OSError as e:  # an output that cannot be written (a full disk, a read-only folder)
        parser.fail(f"cannot write {e.filename or args.out} ({e.strerror or e}); free space or pass another "
                    "--out")
    except (MemoryError, RuntimeError) as e:  # too many samples for this machine; anything else is a bug
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate" not in str(e):
            raise
        parser.fail(f"out of memory on {args.device} ({type(e).__name__}); pass a smaller --num-samples")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
