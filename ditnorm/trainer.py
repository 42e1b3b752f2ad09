"""The one training loop: toy DiTs on constant images, and pixel-space DiTs on real images.

train_toy.py and train.py are its command lines (each with its own defaults); experiment.py calls
train_run. Each sample's timestep, noise, image and class dropout come from (seed, step, global sample
index) (ditnorm/data.py, ditnorm/images.py), so a global batch trains identically on any number of ranks
and a resumed run continues exactly, bit for bit, at the same thread count (torch.get_num_threads(), e.g.
OMP_NUM_THREADS): with another, float sums may round differently. A resumed run continues in the folder of
its checkpoint and appends to its log.txt. Besides the DiT EMA every checkpoint keeps the averages of
averaging.py. A run folder appears only once the model is built and the step is ready, and no checkpoint
with a NaN or an infinity in its weights is ever saved.
"""
import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from diffusion import create_diffusion
from ditnorm.averaging import DEFAULT_AVERAGES, WeightAverages, all_reduce_mean, update_ema
from ditnorm.checkpoint import (
    FORMAT,
    CheckpointError,
    load_model,
    nonfinite_parts,
    read_checkpoint,
    save_checkpoint,
)
from ditnorm.data import DATA_KINDS, rank_batches, training_images
from ditnorm.images import IMAGE_DATA, MNIST_SIZE, DataError, load_image_data
from ditnorm.options import (
    Parser,
    add_fast_flag,
    add_intervention_flags,
    add_training_flags,
    check_device,
    check_folder,
    diffusion_steps,
    non_negative_int,
    positive_int,
    step_list,
)
from ditnorm.recipes import CPU, DEFAULTS, IMAGE_DEFAULTS  # noqa: F401 (train.py takes IMAGE_DEFAULTS here)
from ditnorm.records import write_atomic
from fast import describe_timing, make_optimizer, proven_loss
from models import MNIST_MODELS, TOY_MODELS, DiT_models, build_model

# What train.py offers: pixel-space DiTs, each built to fit its data (channels, size, classes).
IMAGE_MODELS = MNIST_MODELS + tuple(name for name in DiT_models if name.startswith("DiT-"))
PRESETS = {"cpu": CPU}  # train_toy.py --preset cpu (ditnorm/recipes.py)
PRESET_HELP = (
    "cpu: batch 256, lr 1e-3, EMA 0.999, 5000 steps, checkpoints at 1000 and 5000. It shows the effect of "
    "the norm on a 2-core CPU in minutes, but trades away the study's batch (noisier gradients), its "
    "learning rate (not the DiT recipe) and its length (less converged); explicit flags override it."
)


def parse_args(argv=None, defaults=DEFAULTS, prog="train_toy.py", description=__doc__):
    """Flags left out stay None; resolve_config fills them (flags > preset > checkpoint > defaults).

    The toy's command (defaults["data"] a toy data kind) and the image one (train.py) share the flags
    below; each shows only its own models, data and defaults."""
    images = defaults["data"] in IMAGE_DATA
    parser = Parser(prog=prog, description=description)
    add_training_flags(parser, defaults, models=IMAGE_MODELS if images else TOY_MODELS)
    add_intervention_flags(parser)
    parser.add_argument("--ckpt-steps", type=step_list, help="comma-separated steps to save a checkpoint at; "
                        "the last step is always saved"
                        + (f" (default: {defaults['ckpt_steps']})" if defaults["ckpt_steps"] else ""))
    parser.add_argument("--ckpt-every", type=non_negative_int, help="also save every N steps; 0 = off "
                        f"(default: {defaults['ckpt_every']})")
    parser.add_argument("--log-every", type=positive_int, help="steps between loss logs; the loss is also "
                        f"checked for NaN/Inf here (default: {defaults['log_every']})")
    parser.add_argument("--diffusion-steps", type=diffusion_steps, help="diffusion timesteps T (linear "
                        f"schedule, learned sigma) (default: {defaults['diffusion_steps']})")
    if images:
        parser.add_argument("--data", choices=IMAGE_DATA,
                            help="mnist: the offline MNIST subset (4,500 training images, 28x28); folder: "
                            "the images of --data-path (default: mnist, or folder when --data-path is given)")
        parser.add_argument("--data-path", help="a folder with one subfolder of images per class, as the "
                            "official train.py takes (grey or RGB, any size; resized and centre-cropped to "
                            "--image-size)")
        parser.add_argument("--image-size", type=positive_int, help="with --data-path: the side the images "
                            "are resized and centre-cropped to, a multiple of the model's patch size "
                            f"(default: {MNIST_SIZE})")
    else:
        parser.add_argument("--data", choices=DATA_KINDS,
                            help="zeros: every image is 0; constant: each image is c * ones, c ~ U[-1, 1] "
                            f"per sample (default: {defaults['data']})")
        parser.add_argument("--preset", choices=sorted(PRESETS), help=PRESET_HELP)
    parser.add_argument("--results-dir", default="results", help="parent of run folders (default: results)")
    parser.add_argument("--resume", help="a checkpoint file, or a run folder (its latest checkpoint); the "
                        "run continues in the checkpoint's run folder, appending to log.txt")
    add_fast_flag(parser)
    # Tests only: poison one step's noise with NaN, as a diverging step would, to exercise the NaN stop.
    parser.add_argument("--debug-nan-at-step", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(**{key: None for key in ("preset", "data_path", "image_size")})
    return parser, parser.parse_args(argv)


def find_checkpoint(path):
    """A checkpoint file as given, or the latest <step>.pt of a run folder (or of its checkpoints/)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        steps = sorted(int(p.stem) for p in folder.glob("*.pt") if p.stem.isdigit())
        return folder / f"{steps[-1]:07d}.pt" if steps else None
    return path if path.is_file() else None


def resolve_config(args, resumed_args, defaults=DEFAULTS):
    """Defaults < the resumed checkpoint's train_args < --preset < flags given on this command line."""
    cfg = {**defaults, **{k: v for k, v in resumed_args.items() if k in DEFAULTS}}
    cfg.update(PRESETS.get(args.preset, {}))
    cfg.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    cfg["preset"] = args.preset or resumed_args.get("preset")
    return cfg


def check_config(parser, cfg, world_size, start_step):
    """Turn every bad combination into a one-line error before anything starts; return the save steps."""
    if cfg["global_batch_size"] % world_size:
        parser.error(f"--global-batch-size {cfg['global_batch_size']} must be a multiple of the world size "
                     f"{world_size}")
    try:
        ckpt_steps = {int(s) for s in str(cfg["ckpt_steps"]).split(",") if s.strip()}
    except ValueError:
        parser.error(f"--ckpt-steps must be comma-separated integers, got {cfg['ckpt_steps']!r}")
    if start_step >= cfg["max_steps"]:
        parser.error(f"the checkpoint is already at step {start_step}; pass a --max-steps above it")
    return ckpt_steps


def setup_distributed(device=None):
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), or stay a world of 1 without one.

    Returns (rank, world_size, device); device defaults to cuda:LOCAL_RANK when CUDA is available."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available here; use --device cpu")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def new_run_dir(results_dir, model, norm):
    """Create results/<index>-<model>-<norm>/ with the next free index; never reuse an existing folder."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(p.name.split("-")[0]) for p in results_dir.iterdir() if p.name.split("-")[0].isdigit()]
        run_dir = results_dir / f"{max(taken, default=-1) + 1:03d}-{model.replace('/', '-')}-{norm}"
        try:
            run_dir.mkdir()  # a concurrent launch may take the same index: then try the next one
            return run_dir
        except FileExistsError:
            continue


def read_resume(parser, args):
    """(checkpoint path, checkpoint, run folder) of --resume; (None, {}, None) without it."""
    if not args.resume:
        return None, {}, None
    ckpt_path = find_checkpoint(args.resume)
    if ckpt_path is None:
        parser.error(f"--resume {args.resume}: no such checkpoint file or run folder with checkpoints")
    try:
        ckpt = read_checkpoint(ckpt_path)
    except CheckpointError as err:
        parser.error(str(err))
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        parser.error(f"--resume {ckpt_path} is not a checkpoint written by train_toy.py")
    problem = resume_problem(ckpt)
    if problem:
        parser.error(f"--resume {ckpt_path} {problem}")
    for key in ("model", "norm"):
        wanted, found = getattr(args, key), ckpt["config"][key]
        if wanted is not None and wanted != found:
            parser.error(f"--resume {ckpt_path} holds {key} {found!r}, not --{key} {wanted!r}")
    # A checkpoint inside a run folder continues that run (same folder, log.txt appended); one outside any
    # run folder starts a new run folder under --results-dir.
    if ckpt_path.parent.name != "checkpoints":
        return ckpt_path, ckpt, None
    later = sorted(p.name for p in ckpt_path.parent.glob("*.pt")
                   if p.stem.isdigit() and int(p.stem) > ckpt["step"])
    if later:
        parser.error(f"{ckpt_path.parent} has later checkpoints ({', '.join(later)}) that this run would "
                     "overwrite; resume from the run folder (its latest checkpoint) instead")
    return ckpt_path, ckpt, ckpt_path.parent.parent


# What a checkpoint needs to continue a run, and the type of each part.
RESUME_PARTS = {"config": dict, "model": dict, "ema": dict, "opt": dict, "step": int, "train_args": dict,
                "rng": dict}


def resume_problem(ckpt):
    """Why a checkpoint of this format cannot continue a run (lacking or non-finite parts), or None."""
    lacking = [key for key, kind in RESUME_PARTS.items() if not isinstance(ckpt.get(key), kind)]
    if not lacking and not torch.is_tensor(ckpt["rng"].get("torch")):
        lacking = ["rng['torch']"]
    if lacking:
        return (f"lacks {', '.join(lacking)}: it can be sampled but not resumed; resume from a checkpoint "
                "that train_toy.py wrote")
    bad = nonfinite_parts(ckpt)
    if bad:
        return (f"holds non-finite {', '.join(bad)} weights (a diverged run); resume from an earlier "
                "checkpoint with a smaller --lr")
    return None


def main(argv=None, defaults=DEFAULTS, prog="train_toy.py", description=__doc__):
    """The command line of train_toy.py (defaults=DEFAULTS) and train.py (defaults=IMAGE_DEFAULTS)."""
    parser, args = parse_args(argv, defaults, prog, description)
    problem = check_folder(args.results_dir) if not args.resume else None
    if problem:
        parser.error(f"--results-dir {args.results_dir}: {problem}")
    if args.device is not None and check_device(args.device):
        parser.error(f"--device {args.device}: {check_device(args.device)}")
    ckpt_path, ckpt, run_dir = read_resume(parser, args)
    if ckpt and run_dir is None and check_folder(args.results_dir):
        parser.error(f"--results-dir {args.results_dir}: {check_folder(args.results_dir)}")
    cfg = resolve_config(args, ckpt.get("train_args", {}), defaults)
    if args.data_path is not None and args.data is None:
        cfg["data"] = "folder"  # --data-path alone: an ImageFolder, as the official train.py takes
    if (cfg["data"] == "folder") != (cfg["data_path"] is not None):
        parser.error("--data folder reads the images of --data-path; pass --data-path DIR alone"
                     if cfg["data"] == "folder" else f"--data {cfg['data']} reads no folder; drop "
                     "--data-path")
    if cfg["image_size"] is not None and cfg["data"] != "folder":
        parser.error(f"--image-size sizes the images of --data-path; the offline MNIST is {MNIST_SIZE}x"
                     f"{MNIST_SIZE}: drop --image-size")
    ckpt_steps = check_config(parser, cfg, int(os.environ.get("WORLD_SIZE", "1")), ckpt.get("step", 0))
    try:
        rank, world_size, device = setup_distributed(args.device)
    except (ValueError, RuntimeError) as err:
        parser.error(f"--device {args.device}: {err}")
    try:
        train(args, cfg, ckpt_steps, ckpt_path, ckpt, run_dir, rank, world_size, device)
    except (CheckpointError, DataError) as err:  # refused before any write
        parser.error(str(err))
    except OSError as err:  # the run folder or its log cannot be written
        where = err.filename or args.results_dir
        raise SystemExit(f"error: cannot write {where} ({err.strerror or err}); free space or pass a "
                         "--results-dir you can write to") from None
    except (MemoryError, RuntimeError) as err:  # a batch that does not fit; anything else is a bug
        if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and "can't allocate" not in str(err):
            raise
        raise SystemExit(f"error: out of memory on {device} ({type(err).__name__}); pass a smaller "
                         "--global-batch-size") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# What may differ between a run's checkpoint and the configuration that resumes it.
RESUMABLE_CHANGES = ("max_steps", "log_every", "ckpt_steps", "ckpt_every")


def train_run(cfg, run_dir, *, device=None, fast="auto", console=False):
    """Train one run of experiment.py into run_dir, or resume it from run_dir's latest checkpoint.

    cfg: DEFAULTS' keys (those left out take DEFAULTS' values). console: print the log lines too (True), or
    print them after a label (a string); False: log.txt only. A finished run (its latest checkpoint at
    cfg["max_steps"]) is left as it is. Returns run_dir. Raises CheckpointError for a checkpoint that cannot
    continue this configuration, DataError for data that cannot be read, and SystemExit (one line) when a
    step or a save fails; run_dir is created only once training can start."""
    cfg = {**DEFAULTS, **cfg}
    run_dir = Path(run_dir)
    ckpt_path = find_checkpoint(run_dir) if run_dir.is_dir() else None
    ckpt = {}
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path)
        problem = resume_problem(ckpt) if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT else (
            "is not a checkpoint written by the trainer")
        if problem:
            raise CheckpointError(f"{ckpt_path} {problem}")
        if ckpt["step"] >= cfg["max_steps"]:
            return run_dir
        saved = {**DEFAULTS, **ckpt["train_args"]}
        changed = sorted(k for k in DEFAULTS if k not in RESUMABLE_CHANGES and saved.get(k) != cfg[k])
        if changed:
            raise CheckpointError(f"{ckpt_path} was trained with another {', '.join(changed)} than asked "
                                  "for; move the run folder away or ask for the configuration it was trained "
                                  "with")
    ckpt_steps = {int(s) for s in str(cfg["ckpt_steps"]).split(",") if s.strip()}
    args = argparse.Namespace(fast=fast, debug_nan_at_step=None, results_dir=str(run_dir.parent))
    _, _, device = setup_distributed(device)  # a world of one: the runner trains runs side by side
    train(args, cfg, ckpt_steps, ckpt_path, ckpt, run_dir, 0, 1, device, console=console)
    return run_dir


class RunLog:
    """log.txt of a run and the console, written by rank 0 only. Lines logged before the run folder exists
    (open) are printed at once and written to log.txt when it opens."""

    def __init__(self, rank, console=True):
        self.rank, self.file, self.pending, self.console = rank, None, [], console

    def open(self, run_dir):
        if self.rank == 0:
            self.file = open(run_dir / "log.txt", "a")
            self.file.writelines(self.pending)
            self.file.flush()
            self.pending = []

    def __call__(self, message):
        if self.rank == 0:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
            if self.console:  # True, or a label for the console lines (experiment.py: the run's name)
                print(line if self.console is True else f"{self.console}: {line}", flush=True)
            if self.file is None:
                self.pending.append(line + "\n")
                return
            try:
                self.file.write(line + "\n")
                self.file.flush()
            except OSError:  # a full disk: the console still has the line, and fail() still says why
                pass

    def fail(self, message):
        """Stop every rank (all reach this with the same reduced losses); rank 0 says why in one line."""
        self(message)
        raise SystemExit(f"error: {message}" if self.rank == 0 else 1)

    def close(self):
        if self.file:
            self.file.close()


def build_training_state(cfg, ckpt, ckpt_path, device, rank, fit=None):
    """(model, ema, averages, optimizer), fresh from cfg's seed or restored from the checkpoint. fit: the
    DiT kwargs that size a fresh model to its data (in_channels, input_size, num_classes)."""
    # Model init is the only draw from the global RNG; training noise comes from (seed, step).
    torch.manual_seed(cfg["seed"])
    if ckpt:
        model = load_model(ckpt_path, use_ema=False, device=device)[0].train()
        torch.set_rng_state(ckpt["rng"]["torch"])
    else:
        model = build_model(cfg["model"], norm=cfg["norm"], dropout=cfg["dropout"], cap=cfg["cap"],
                            **(fit or {})).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # Other averages of the weights beside the DiT EMA (averaging.py); rank 0 alone keeps them.
    averages = WeightAverages(model, DEFAULT_AVERAGES) if rank == 0 else None
    optimizer = make_optimizer(model.parameters(), cfg["lr"], cfg["weight_decay"])
    if ckpt:
        try:
            ema.load_state_dict(ckpt["ema"])
            if averages is not None and "averages" in ckpt:  # (older checkpoints: they start again here)
                averages.load_state_dict(ckpt["averages"])
            optimizer.load_state_dict(ckpt["opt"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"--resume {ckpt_path}: its EMA, averages or optimizer state do not fit "
                                  f"the model ({type(err).__name__}: {reason}); resume from a complete "
                                  "checkpoint of the same run") from None
        for group in optimizer.param_groups:
            group["lr"] = cfg["lr"]  # an explicit --lr on resume wins over the saved one
            group["foreach"], group["fused"] = None, True  # the fused kernel (the same update rule)
    return model, ema, averages, optimizer


def save(path, step, cfg, model_config, model, ema, averages, optimizer):
    """One checkpoint: plain data only, so that torch.load(weights_only=True) reads it. Returns None, or
    why nothing was written (weights that are not finite, a failed write)."""
    ckpt = {"format": FORMAT, "config": model_config, "model": model.state_dict(), "ema": ema.state_dict(),
            "averages": averages.state_dict(), "opt": optimizer.state_dict(), "step": step, "train_args": cfg,
            "rng": {"torch": torch.get_rng_state()}}
    bad = nonfinite_parts(ckpt)
    if bad:
        # The loss of this step was finite, but its update was not (e.g. lr / (1 - beta1) overflows float32).
        return (f"the {', '.join(bad)} weights are not finite after step {step}, so nothing was saved; "
                "training stopped", "resume it with a smaller --lr")
    try:
        save_checkpoint(ckpt, path)
    except OSError as err:
        return (f"cannot write {path} ({err.strerror or err}); training stopped",
                "free space (or fix the folder) and resume it")
    return None


def plain_loss(model, diffusion):
    """loss(x_start, t, noise, y, drop=None) -> the batch mean of the official hybrid loss of model; drop (b,)
    marks the samples trained with the null class (classifier-free guidance)."""
    def loss(x_start, t, noise, y, drop=None):
        kwargs = {"y": y} if drop is None else {"y": y, "force_drop_ids": drop}
        return diffusion.training_losses(model, x_start, t, model_kwargs=kwargs, noise=noise)["loss"].mean()

    loss.path = "plain"
    return loss


def step_with(loss_fn, model, ema, optimizer, ema_decay, world_size):
    """The step of the official train.py around loss_fn: backward, gradient mean over ranks, AdamW, EMA.

    step(x_start, t, noise, y, drop=None) -> the local mean loss; drop is drawn by the caller so that every
    rank count draws the same, and passed on only when given (fast/'s loss takes none)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x_start, t, noise, y, drop=None):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x_start, t, noise, y) if drop is None else loss_fn(x_start, t, noise, y, drop)
        loss.backward()
        if world_size > 1:
            for p in params:
                if p.grad is None:  # every rank must send the same buffer layout
                    p.grad = torch.zeros_like(p)
            all_reduce_mean([p.grad for p in params], world_size)
        optimizer.step()
        update_ema(list(ema.parameters()), list(model.parameters()), ema_decay)
        return loss.detach()

    step.path = loss_fn.path
    return step


def plain_train_step(model, ema, diffusion, optimizer, ema_decay, world_size):
    """The official train.py's step with the plain loss. Every run takes it unless fast/ proves a loss
    that replaces plain_loss (make_train_step)."""
    return step_with(plain_loss(model, diffusion), model, ema, optimizer, ema_decay, world_size)


def make_train_step(fast, model, ema, diffusion, optimizer, ema_decay, world_size, class_dropout,
                    batch_size=None):
    """The step around fast/'s proven loss with fast="auto" (fast.proven_loss; given batch_size, the local
    batch, it must also be faster on it), else around the plain loss; step.path names which ("plain" for
    the plain one), step.fast_reason why not fast (or None), step.fast_timing both times (or None)."""
    if fast == "off":
        loss, reason = None, "fast='off'"
    elif class_dropout:
        loss, reason = None, "class dropout (drawn per step) is not in the fast path"
    else:
        loss, reason = proven_loss(model, diffusion, batch_size)
    step = step_with(loss or plain_loss(model, diffusion), model, ema, optimizer, ema_decay, world_size)
    step.fast_reason, step.fast_timing = reason, getattr(loss, "timing", None)
    return step


def data_fit(images, model_name):
    """The DiT kwargs that fit a model to the images (in_channels, input_size, num_classes); DataError when
    the image size is no multiple of the model's patch size."""
    channels, size, _ = images.shape
    patch = DiT_models[model_name].arch["patch_size"]
    if size % patch:
        fits = ", ".join(str(s) for s in (size - size % patch, size - size % patch + patch) if s > 0)
        raise DataError(f"{model_name} cuts {patch}x{patch} patches, so its images need a side that is a "
                        f"multiple of {patch}, not {size}; pass --image-size {fits.replace(', ', ' or ')}")
    return {"in_channels": channels, "input_size": size, "num_classes": images.num_classes}


def check_data_fits(images, model):
    """Why a resumed checkpoint's model cannot train on these images (shape or class count), or None."""
    cfg = model.config
    want = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    if images.shape != want:
        return (f"the {images.name} images are {'x'.join(map(str, images.shape))} but the checkpoint's model "
                f"takes {'x'.join(map(str, want))}; resume it on the data it was trained on")
    if images.num_classes > cfg["num_classes"]:
        return (f"the {images.name} images have {images.num_classes} classes but the checkpoint's model has "
                f"{cfg['num_classes']}; resume it on the data it was trained on")
    return None


def train(args, cfg, ckpt_steps, ckpt_path, ckpt, run_dir, rank, world_size, device, console=True):
    """Build or restore the model, EMA, averages and optimizer, then train up to cfg['max_steps']."""
    start_step, max_steps, log_every = ckpt.get("step", 0), cfg["max_steps"], cfg["log_every"]
    log = RunLog(rank, console)
    # Everything that can fail at the start comes before the run folder, so that a failed start leaves none.
    images = load_image_data(cfg["data"], cfg["data_path"], cfg.get("image_size")) \
        if cfg["data"] in IMAGE_DATA else None
    fit = data_fit(images, cfg["model"]) if images is not None else None
    model, ema, averages, optimizer = build_training_state(cfg, ckpt, ckpt_path, device, rank, fit)
    if images is not None and check_data_fits(images, model):
        raise DataError(check_data_fits(images, model))
    diffusion = create_diffusion(timestep_respacing="", diffusion_steps=cfg["diffusion_steps"])
    drop_prob = model.config["class_dropout_prob"] if images is not None else 0.0
    if device.type == "cuda":
        # cuDNN convolutions (the patch embedding) default to TF32 on Ampere and later: ~1e-3 relative
        # error, the size of the effects the study measures. Training stays fp32 throughout.
        torch.backends.cudnn.allow_tf32 = False
    train_step = make_train_step(args.fast, model, ema, diffusion, optimizer, cfg["ema_decay"], world_size,
                                 drop_prob > 0, cfg["global_batch_size"] // world_size)
    model_config = {"model": cfg["model"], **model.config}
    # The toys have one class (label 0, no class dropout): zeros, or constants with --data constant.
    local_batch = cfg["global_batch_size"] // world_size
    shape = (model.config["in_channels"], model.config["input_size"], model.config["input_size"])
    y, drop = torch.zeros(local_batch, dtype=torch.long, device=device), None  # (b,)
    if rank == 0:  # rank 0 alone owns the run folder and writes into it; config.json first
        run_dir = run_dir or new_run_dir(args.results_dir, cfg["model"], cfg["norm"])
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        run_config = {"train_args": cfg, "model_config": model_config, "world_size": world_size,
                      "device": str(device), "fast": args.fast, "step_path": train_step.path,
                      "fast_reason": train_step.fast_reason, "fast_timing": train_step.fast_timing,
                      "averages": list(DEFAULT_AVERAGES), "resumed_from": str(ckpt_path) if ckpt else None,
                      "start_step": start_step, "torch": torch.__version__}
        # Replaced whole: a run killed while writing it (a resume rewrites it) must not leave half a JSON.
        write_atomic(run_dir / "config.json", json.dumps(run_config, indent=2) + "\n")
        log.open(run_dir)

    log(f"run folder {run_dir}" + (f", resumed from {ckpt_path} at step {start_step}" if ckpt else ""))
    log(f"world size {world_size}, device {device}, step path {train_step.path}"
        + (f" (fast path not used: {train_step.fast_reason})" if train_step.fast_reason else "")
        + (f" ({describe_timing(train_step.fast_timing, 'step (loss and gradients)')})"
           if train_step.fast_timing else "")
        + f", train args {json.dumps(cfg)}")
    log(f"model {json.dumps(model_config)}, {sum(p.numel() for p in model.parameters()):,} parameters")

    steps = range(start_step + 1, max_steps + 1)
    batches = rank_batches(cfg["seed"], steps, cfg["global_batch_size"], rank, world_size,
                           diffusion.num_timesteps, shape, device)

    # Losses stay on the device between checks (no per-step host sync). A check, at every log step and
    # before every save, all-reduces the per-step losses since the last check and stops at the first
    # non-finite one: the message names the exact step, and a non-finite model is never saved.
    # (window,) local mean loss per step; a check comes at least every log_every steps and at the last one.
    losses = torch.zeros(min(log_every, max_steps - start_step), device=device)
    last_check, last_saved, tick = start_step, ckpt_path, time.perf_counter()
    loop_start = tick
    for step, (t, noise) in zip(steps, batches, strict=True):
        if step == args.debug_nan_at_step:
            noise = torch.full_like(noise, float("nan"))
        if images is not None:  # (b, C, H, W), (b,), (b,) or None
            x_start, y, drop = images.batch(cfg["seed"], step, cfg["global_batch_size"], rank, world_size,
                                            device, drop_prob)
        else:
            x_start = training_images(cfg["data"], cfg["seed"], step, cfg["global_batch_size"], rank,
                                      world_size, shape, device)  # (b, C, H, W)
        losses[step - last_check - 1] = train_step(x_start, t, noise, y, drop)
        if averages is not None:
            averages.update(step)

        every = cfg["ckpt_every"]
        is_save = step in ckpt_steps or (every > 0 and step % every == 0) or step == max_steps
        if step % log_every == 0 or is_save:
            window = losses[:step - last_check]
            if world_size > 1:
                dist.all_reduce(window)  # sum over ranks
            window = (window / world_size).tolist()  # the only host sync between checks
            bad = [i for i, value in enumerate(window) if not math.isfinite(value)]
            if bad:  # every checkpoint saved (or resumed from) is finite, so last_saved is a good one
                log.fail(f"loss is {window[bad[0]]} at step {last_check + 1 + bad[0]}; training stopped, the "
                         f"last good checkpoint is {last_saved or 'none (none saved yet)'}; resume it with a "
                         "smaller --lr")
            seconds = time.perf_counter() - tick
            mean = sum(window) / len(window)
            log(f"step {step:07d} | loss {mean:.6f} | steps/s {len(window) / seconds:.2f}")
            last_check, tick = step, time.perf_counter()
        if is_save:
            problem = None
            if rank == 0:
                path = run_dir / "checkpoints" / f"{step:07d}.pt"
                problem = save(path, step, cfg, model_config, model, ema, averages, optimizer)
                if problem is None:
                    log(f"saved {path}")
                    last_saved = path
            if world_size > 1:  # every rank learns whether rank 0 saved; also the barrier after the save
                failed = torch.tensor([problem is not None], dtype=torch.int32, device=device)
                dist.all_reduce(failed)
                problem = problem or (("rank 0 could not save", "") if failed.item() else None)
            if problem:
                what, advice = problem
                log.fail(f"{what}, the last good checkpoint is {last_saved or 'none (none saved yet)'}"
                         + (f"; {advice}" if last_saved else ""))
    log(f"done: {len(steps)} steps in {time.perf_counter() - loop_start:.1f} s of training loop "
        "(the checkpoint saves included)")
    log.close()

