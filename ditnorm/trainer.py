"""The one training loop: toy DiTs on constant images (train_toy.py), pixel-space DiTs on real images
(train.py), and every run of experiment.py (train_run). `train` reads as the official DiT train.py does.

Each sample's timestep, noise, image and class dropout come from (seed, step, global sample index)
(data.py, images.py), so a global batch trains identically on any number of ranks and a resume continues
bit for bit at the same thread count (torch.get_num_threads()). A run folder appears only once training
can start, and no checkpoint with a NaN or an infinity in its weights is saved.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from diffusion import create_diffusion
from ditnorm import layout
from ditnorm.averaging import DEFAULT_AVERAGES, WeightAverages, all_reduce_mean, update_ema
from ditnorm.checkpoint import (
    FORMAT,
    CheckpointError,
    first_line,
    load_model,
    nonfinite_parts,
    read_checkpoint,
    save_checkpoint,
)
from ditnorm.data import DATA_KINDS, ToyData, rank_batches
from ditnorm.images import IMAGE_DATA, MNIST_SIZE, DataError, load_image_data
from ditnorm.options import (
    Parser,
    add_fast_flag,
    add_image_size_flag,
    add_training_flags,
    check_device,
    check_folder,
)
from ditnorm.recipes import DEFAULTS, IMAGE_DEFAULTS, RECIPES  # noqa: F401 (train.py takes IMAGE_DEFAULTS here)
from ditnorm.records import write_atomic
from fast import describe_timing, make_optimizer, proven_loss
from models import MNIST_MODELS, TOY_MODELS, DiT_models, build_model

# What train.py offers: pixel-space DiTs, each built to fit its data (channels, size, classes).
IMAGE_MODELS = MNIST_MODELS + tuple(name for name in DiT_models if name.startswith("DiT-"))
# What a checkpoint needs to continue a run, and the type of each part.
RESUME_PARTS = {"config": dict, "model": dict, "ema": dict, "opt": dict, "step": int, "train_args": dict,
                "rng": dict}
# What may differ between a run's checkpoint and the configuration that resumes it (train_run).
RESUMABLE_CHANGES = ("max_steps", "log_every", "ckpt_steps", "ckpt_every")


def parse_args(argv=None, defaults=DEFAULTS, prog="train_toy.py", description=__doc__):
    """Flags left out stay None; main fills them (flags > --recipe > the resumed checkpoint > defaults)."""
    images = defaults["data"] in IMAGE_DATA
    parser = Parser(prog=prog, description=description)
    add_training_flags(parser, defaults, models=IMAGE_MODELS if images else TOY_MODELS)
    if images:
        parser.add_argument("--data", choices=IMAGE_DATA,
                            help="mnist: the offline MNIST subset (4,500 training images, 28x28); folder: "
                            "the images of --data-path (default: mnist, or folder when --data-path is given)")
        parser.add_argument("--data-path", help="a folder with one subfolder of images per class, as the "
                            "official train.py takes (grey or RGB, any size; resized and centre-cropped to "
                            "--image-size)")
        add_image_size_flag(parser)
    else:
        parser.add_argument("--data", choices=DATA_KINDS, help="zeros: every image is 0; constant: each "
                            f"image is c * ones, c ~ U[-1, 1] per sample (default: {defaults['data']})")
        parser.add_argument("--preset", choices=sorted(RECIPES), help="deprecated: the old name of --recipe")
    parser.add_argument("--results-dir", default="results", help="parent of run folders (default: results)")
    parser.add_argument("--resume", help="a checkpoint file, or a run folder (its latest checkpoint); the "
                        "run continues in the checkpoint's run folder, appending to log.txt")
    add_fast_flag(parser)
    # Tests only: poison one step's noise with NaN, as a diverging step would, to exercise the NaN stop.
    parser.add_argument("--debug-nan-at-step", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(**{key: None for key in ("preset", "data_path", "image_size")})
    return parser, parser.parse_args(argv)


def resumable(path):
    """(checkpoint file, checkpoint) to continue a run from: a checkpoint file, or a run folder's latest;
    CheckpointError when there is none, or when it cannot continue a run (lacking or non-finite parts)."""
    ckpt_path = layout.latest_checkpoint(path)
    if ckpt_path is None:
        raise CheckpointError(f"--resume {path}: no such checkpoint file or run folder with checkpoints")
    ckpt = read_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_path} is not a checkpoint written by train_toy.py")
    lacking = [key for key, kind in RESUME_PARTS.items() if not isinstance(ckpt.get(key), kind)]
    if not lacking and not torch.is_tensor(ckpt["rng"].get("torch")):
        lacking = ["rng['torch']"]
    if lacking:
        raise CheckpointError(f"{ckpt_path} lacks {', '.join(lacking)}: it can be sampled but not resumed; "
                              "resume from a checkpoint that train_toy.py wrote")
    if bad := nonfinite_parts(ckpt):
        raise CheckpointError(f"{ckpt_path} holds non-finite {', '.join(bad)} weights (a diverged run); "
                              "resume from an earlier checkpoint with a smaller --lr")
    return ckpt_path, ckpt


def main(argv=None, defaults=DEFAULTS, prog="train_toy.py", description=__doc__):
    """The command line of train_toy.py (defaults=DEFAULTS) and train.py (defaults=IMAGE_DEFAULTS)."""
    parser, args = parse_args(argv, defaults, prog, description)
    if args.preset is not None:  # "preset" is experiment.py's word: a grid of runs, not a recipe
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: --preset is deprecated (a preset is experiment.py's); use --recipe {args.preset}",
                  file=sys.stderr)
        args.recipe = args.recipe or args.preset
    if args.device is not None and (problem := check_device(args.device)):
        parser.error(f"--device {args.device}: {problem}")
    try:
        ckpt_path, ckpt = resumable(args.resume) if args.resume else (None, {})
    except CheckpointError as err:
        parser.error(str(err))
    for key in ("model", "norm") if ckpt else ():
        if getattr(args, key) not in (None, ckpt["config"][key]):
            parser.error(f"--resume {ckpt_path} holds {key} {ckpt['config'][key]!r}, not --{key} "
                         f"{getattr(args, key)!r}")
    # A checkpoint in a run folder continues that run (log.txt appended); one outside any starts a new one.
    run_dir = layout.run_of(ckpt_path) if ckpt else None
    later = [p.name for step, p in layout.run_checkpoints(run_dir).items() if step > ckpt["step"]] \
        if run_dir else []
    if later:
        parser.error(f"{ckpt_path.parent} has later checkpoints ({', '.join(later)}) that this run would "
                     "overwrite; resume from the run folder (its latest checkpoint) instead")
    if run_dir is None and (problem := check_folder(args.results_dir)):
        parser.error(f"--results-dir {args.results_dir}: {problem}")
    resumed = ckpt.get("train_args", {})
    cfg = {**defaults, **{k: v for k, v in resumed.items() if k in DEFAULTS}, **RECIPES.get(args.recipe, {}),
           **{k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}}
    if args.data_path is not None and args.data is None:
        cfg["data"] = "folder"  # --data-path alone: an ImageFolder, as the official train.py takes
    if (cfg["data"] == "folder") != (cfg["data_path"] is not None):
        parser.error("--data folder reads the images of --data-path; pass --data-path DIR alone"
                     if cfg["data"] == "folder" else f"--data {cfg['data']} reads no folder; drop "
                     "--data-path")
    if cfg["image_size"] is not None and cfg["data"] != "folder":
        parser.error(f"--image-size sizes the images of --data-path; the offline MNIST is {MNIST_SIZE}x"
                     f"{MNIST_SIZE}: drop --image-size")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["global_batch_size"] % world_size:
        parser.error(f"--global-batch-size {cfg['global_batch_size']} must be a multiple of the world size "
                     f"{world_size}")
    if ckpt and ckpt["step"] >= cfg["max_steps"]:
        parser.error(f"the checkpoint is already at step {ckpt['step']}; pass a --max-steps above it")
    try:
        rank, world_size, device = setup_distributed(args.device)
    except RuntimeError as err:  # torchrun's process group could not be joined
        parser.error(f"--device {args.device}: {err}")
    try:
        train(cfg, run_dir, ckpt_path, ckpt, results_dir=args.results_dir, fast=args.fast, rank=rank,
              world_size=world_size, device=device, nan_at_step=args.debug_nan_at_step)
    except (CheckpointError, DataError) as err:  # refused before any write
        parser.error(str(err))
    except OSError as err:  # the run folder or its log cannot be written
        raise SystemExit(f"error: cannot write {err.filename or args.results_dir} ({err.strerror or err}); "
                         "free space or pass a --results-dir you can write to") from None
    except (MemoryError, RuntimeError) as err:  # a batch that does not fit; anything else is a bug
        if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and "can't allocate" not in str(err):
            raise
        raise SystemExit(f"error: out of memory on {device} ({type(err).__name__}); pass a smaller "
                         "--global-batch-size") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_run(cfg, run_dir, *, device=None, fast="auto", console=False):
    """Train one run of experiment.py into run_dir, or resume it from run_dir's latest checkpoint.

    cfg: DEFAULTS' keys (those left out take DEFAULTS' values). console: print the log lines too (True),
    after a label (a string), or not (False). A finished run is left as it is. Returns run_dir. Raises
    CheckpointError for a checkpoint that cannot continue cfg, DataError for data that cannot be read, and
    SystemExit (one line) when a step or a save fails."""
    cfg, run_dir = {**DEFAULTS, **cfg}, Path(run_dir)
    ckpt_path, ckpt = resumable(run_dir) if layout.latest_checkpoint(run_dir) else (None, {})
    if ckpt:
        if ckpt["step"] >= cfg["max_steps"]:
            return run_dir
        saved = {**DEFAULTS, **ckpt["train_args"]}
        changed = sorted(k for k in DEFAULTS if k not in RESUMABLE_CHANGES and saved.get(k) != cfg[k])
        if changed:
            raise CheckpointError(f"{ckpt_path} was trained with another {', '.join(changed)} than asked "
                                  "for; move the run folder away or ask for the configuration it was trained "
                                  "with")
    _, _, device = setup_distributed(device)  # a world of one: the runner trains runs side by side
    train(cfg, run_dir, ckpt_path, ckpt, results_dir=run_dir.parent, fast=fast, console=console,
          device=device)
    return run_dir


def setup_distributed(device=None):
    """(rank, world_size, device): torchrun's process group joined (NCCL on CUDA, gloo on CPU), or a world
    of 1 without one; device defaults to cuda:LOCAL_RANK when CUDA is available (check_device checked it)."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if device.index is None
                              else device.index)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def build_training_state(cfg, ckpt, ckpt_path, device, rank, fit=None):
    """(model, ema, averages, optimizer), fresh from cfg's seed or restored from the checkpoint. fit: the
    DiT kwargs that size a fresh model to its data (in_channels, input_size, num_classes)."""
    torch.manual_seed(cfg["seed"])  # model init is the only draw from the global RNG
    if ckpt:
        model = load_model(ckpt_path, use_ema=False, device=device)[0].train()
        torch.set_rng_state(ckpt["rng"]["torch"])
    else:
        model = build_model(cfg["model"], norm=cfg["norm"], dropout=cfg["dropout"], cap=cfg["cap"],
                            **(fit or {})).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    averages = WeightAverages(model, DEFAULT_AVERAGES) if rank == 0 else None  # averaging.py; rank 0's
    optimizer = make_optimizer(model.parameters(), cfg["lr"], cfg["weight_decay"])
    if ckpt:
        try:
            ema.load_state_dict(ckpt["ema"])
            if averages is not None and "averages" in ckpt:  # (older checkpoints: they start again here)
                averages.load_state_dict(ckpt["averages"])
            optimizer.load_state_dict(ckpt["opt"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"--resume {ckpt_path}: its EMA, averages or optimizer state do not fit "
                                  f"the model ({first_line(err)}); resume from a complete checkpoint of the "
                                  "same run") from None
        for group in optimizer.param_groups:
            group["lr"] = cfg["lr"]  # an explicit --lr on resume wins over the saved one
            group["foreach"], group["fused"] = None, True  # the fused kernel (the same update rule)
    return model, ema, averages, optimizer


def image_data(cfg, ckpt_model=None):
    """(ImageData, the DiT kwargs that fit a fresh model to it) of cfg's images; DataError when the model
    cannot train on them (a patch size the side is no multiple of; a resumed model of another shape)."""
    images = load_image_data(cfg["data"], cfg["data_path"], cfg.get("image_size"))
    channels, size, _ = images.shape
    patch = DiT_models[cfg["model"]].arch["patch_size"]
    if size % patch:
        fits = " or ".join(str(s) for s in (size - size % patch, size - size % patch + patch) if s > 0)
        raise DataError(f"{cfg['model']} cuts {patch}x{patch} patches, so its images need a side that is a "
                        f"multiple of {patch}, not {size}; pass --image-size {fits}")
    if ckpt_model is not None:
        want = (ckpt_model["in_channels"], ckpt_model["input_size"], ckpt_model["input_size"])
        if images.shape != want:
            raise DataError(f"the {images.name} images are {'x'.join(map(str, images.shape))} but the "
                            f"checkpoint's model takes {'x'.join(map(str, want))}; resume it on the data it "
                            "was trained on")
        if images.num_classes > ckpt_model["num_classes"]:
            raise DataError(f"the {images.name} images have {images.num_classes} classes but the "
                            f"checkpoint's model has {ckpt_model['num_classes']}; resume it on the data it "
                            "was trained on")
    return images, {"in_channels": channels, "input_size": size, "num_classes": images.num_classes}


def diffusion_loss(model, diffusion, x, t, noise, y, drop=None):
    """The batch mean of the official hybrid loss; drop (b,): 1 where a sample trains the null class."""
    kwargs = {"y": y} if drop is None else {"y": y, "force_drop_ids": drop}
    return diffusion.training_losses(model, x, t, model_kwargs=kwargs, noise=noise)["loss"].mean()


def fast_loss(fast, model, diffusion, class_dropout, batch_size=None):
    """(fast/'s loss(x, t, noise, y), None) to take instead of diffusion_loss, once fast.proven_loss has
    proven it on this model (given batch_size, the local batch, also faster on it); else (None, why not)."""
    if fast == "off":
        return None, "fast='off'"
    if class_dropout:
        return None, "class dropout (drawn per step) is not in the fast path"
    return proven_loss(model, diffusion, batch_size)


def optimizer_step(loss, model, ema, optimizer, ema_decay, world_size):
    """The official train.py's step after its loss: backward, the gradients' mean over ranks, AdamW, EMA."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world_size > 1:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # every rank must send the same buffer layout
                p.grad = torch.zeros_like(p)
        all_reduce_mean([p.grad for p in params], world_size)
    optimizer.step()
    update_ema(list(ema.parameters()), list(model.parameters()), ema_decay)


def save(path, step, cfg, model_config, model, ema, averages, optimizer):
    """One checkpoint of plain data (torch.load(weights_only=True) reads it). Returns None, or (what went
    wrong, what to do) when nothing was written (weights that are not finite, a failed write)."""
    ckpt = {"format": FORMAT, "config": model_config, "model": model.state_dict(), "ema": ema.state_dict(),
            "averages": averages.state_dict(), "opt": optimizer.state_dict(), "step": step, "train_args": cfg,
            "rng": {"torch": torch.get_rng_state()}}
    if bad := nonfinite_parts(ckpt):  # a finite loss, but an update that was not (lr / (1 - beta1) = inf)
        return (f"the {', '.join(bad)} weights are not finite after step {step}, so nothing was saved; "
                "training stopped", "resume it with a smaller --lr")
    try:
        save_checkpoint(ckpt, path)
    except OSError as err:
        return (f"cannot write {path} ({err.strerror or err}); training stopped",
                "free space (or fix the folder) and resume it")
    return None


class RunLog:
    """Rank 0's log: run_dir/log.txt (appended) and the console (console: True, or a label for each line)."""

    def __init__(self, rank, console, run_dir):
        self.rank, self.console = rank, console
        self.file = open(Path(run_dir, layout.LOG), "a") if rank == 0 else None

    def __call__(self, message):
        if self.rank == 0:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
            if self.console:
                print(line if self.console is True else f"{self.console}: {line}", flush=True)
            try:
                self.file.write(line + "\n")
                self.file.flush()
            except OSError:  # a full disk: the console still has the line, and fail() still says why
                pass

    def fail(self, message):
        """Stop every rank (all reach this with the same reduced losses); rank 0 says why in one line."""
        self(message)
        raise SystemExit(f"error: {message}" if self.rank == 0 else 1)


def train(cfg, run_dir, ckpt_path, ckpt, *, results_dir, fast, device, rank=0, world_size=1, console=True,
          nan_at_step=None):
    """Build or restore the model, EMA, averages and optimizer, then train up to cfg['max_steps']."""
    # Everything that can fail at the start comes before the run folder, so that a failed start leaves none.
    images, fit = (None, None) if cfg["data"] not in IMAGE_DATA else \
        image_data(cfg, ckpt.get("config") if ckpt else None)
    model, ema, averages, optimizer = build_training_state(cfg, ckpt, ckpt_path, device, rank, fit)
    data = images or ToyData(cfg["data"], model.config)
    drop_prob = model.config["class_dropout_prob"] if images is not None else 0.0
    diffusion = create_diffusion(timestep_respacing="", diffusion_steps=cfg["diffusion_steps"])
    if device.type == "cuda":  # cuDNN's TF32 (~1e-3 relative error) is the size of the effects measured
        torch.backends.cudnn.allow_tf32 = False
    batch_size = cfg["global_batch_size"] // world_size  # per rank
    loss_fn, fast_reason = fast_loss(fast, model, diffusion, drop_prob > 0, batch_size)
    step_path, fast_timing = getattr(loss_fn, "path", "plain"), getattr(loss_fn, "timing", None)
    model_config = {"model": cfg["model"], **model.config}
    start_step, max_steps = ckpt.get("step", 0), cfg["max_steps"]

    if rank == 0:  # rank 0 alone owns the run folder and writes into it; config.json first, replaced whole
        run_dir = run_dir or layout.new_run_dir(results_dir, cfg["model"], cfg["norm"])
        layout.checkpoint_path(run_dir, 0).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(run_dir, layout.CONFIG), json.dumps({
            "train_args": cfg, "model_config": model_config, "world_size": world_size, "device": str(device),
            "fast": fast, "step_path": step_path, "fast_reason": fast_reason, "fast_timing": fast_timing,
            "averages": list(DEFAULT_AVERAGES), "resumed_from": str(ckpt_path) if ckpt else None,
            "start_step": start_step, "torch": torch.__version__}, indent=2) + "\n")
    log = RunLog(rank, console, run_dir)
    log(f"run folder {run_dir}" + (f", resumed from {ckpt_path} at step {start_step}" if ckpt else ""))
    log(f"world size {world_size}, device {device}, step path {step_path}"
        + (f" (fast path not used: {fast_reason})" if fast_reason else "")
        + (f" ({describe_timing(fast_timing, 'step (loss and gradients)')})" if fast_timing else "")
        + f", train args {json.dumps(cfg)}")
    log(f"model {json.dumps(model_config)}, {sum(p.numel() for p in model.parameters()):,} parameters")

    save_steps = {int(s) for s in str(cfg["ckpt_steps"]).split(",") if s.strip()}
    every, log_every = cfg["ckpt_every"], cfg["log_every"]
    steps = range(start_step + 1, max_steps + 1)
    shape = (model.config["in_channels"], model.config["input_size"], model.config["input_size"])
    batches = rank_batches(cfg["seed"], steps, cfg["global_batch_size"], rank, world_size,
                           diffusion.num_timesteps, shape, device)
    # Losses stay on the device between checks (no per-step host sync). A check, at every log step and
    # before every save, all-reduces the losses since the last one and stops at the first non-finite one.
    losses = torch.zeros(min(log_every, max_steps - start_step), device=device)  # (window,)
    last_check, last_saved, tick = start_step, ckpt_path, time.perf_counter()
    loop_start = tick
    for step, (t, noise) in zip(steps, batches, strict=True):  # (b,), (b, C, H, W)
        if step == nan_at_step:
            noise = torch.full_like(noise, float("nan"))
        x, y, drop = data.batch(cfg["seed"], step, cfg["global_batch_size"], rank, world_size, device,
                                drop_prob)  # (b, C, H, W), (b,), (b,) or None
        if loss_fn is None:
            loss = diffusion_loss(model, diffusion, x, t, noise, y, drop)
        else:  # fast/'s proven replacement: the same loss and gradients
            loss = loss_fn(x, t, noise, y)
        optimizer_step(loss, model, ema, optimizer, cfg["ema_decay"], world_size)
        if averages is not None:
            averages.update(step)
        losses[step - last_check - 1] = loss.detach()

        is_save = step in save_steps or (every > 0 and step % every == 0) or step == max_steps
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
            log(f"step {step:07d} | loss {sum(window) / len(window):.6f} | steps/s "
                f"{len(window) / (time.perf_counter() - tick):.2f}")
            last_check, tick = step, time.perf_counter()
        if is_save:
            problem = None
            if rank == 0:
                path = layout.checkpoint_path(run_dir, step)
                problem = save(path, step, cfg, model_config, model, ema, averages, optimizer)
                if problem is None:
                    log(f"saved {path}")
                    last_saved = path
            if world_size > 1:  # every rank learns whether rank 0 saved; also the barrier after the save
                failed = torch.tensor([problem is not None], dtype=torch.int32, device=device)
                dist.all_reduce(failed)
                problem = problem or (("rank 0 could not save", "") if failed.item() else None)
            if problem:
                log.fail(f"{problem[0]}, the last good checkpoint is {last_saved or 'none (none saved yet)'}"
                         + (f"; {problem[1]}" if last_saved else ""))
    log(f"done: {len(steps)} steps in {time.perf_counter() - loop_start:.1f} s of training loop "
        "(the checkpoint saves included)")
    if log.file:
        log.file.close()
