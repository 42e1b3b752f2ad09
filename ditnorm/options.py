"""Command-line pieces shared by the scripts: one definition per flag, and a check of every value where it
enters. A bad value is one line that says what to do (exit status 2) before any work starts; the checks
that need the machine or the disk (check_device, check_folder, check_output_file) return what is wrong, or
None, for the caller's parser.error.
"""

import argparse
import math
import os
from pathlib import Path

import torch

from diffusion import get_named_beta_schedule
from ditnorm.recipes import RECIPES
from models import NORM_KINDS, TOY_MODELS

MAX_DIFFUSION_STEPS = 100_000  # longer than this is no setting of the study (DiT: 1000)
FLOAT32_MAX = 3.4e38  # a learning rate of 1e39 is inf in float32


class Parser(argparse.ArgumentParser):
    """argparse whose --help keeps the docstring examples as written and shows each default, and whose user
    errors are one line (no usage block), printed by rank 0 only under torchrun."""

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):
            text = action.help or ""
            if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
                text += " (default: %(default)s)"
            return text

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=self.Formatter, **kwargs)

    def error(self, message, status=2):
        """A usage error: one line, exit status 2 (fail: a valid request that failed, status 1)."""
        self.exit(status, None if int(os.environ.get("RANK", "0")) else f"{self.prog}: error: {message}\n")

    def fail(self, message):
        self.error(message, status=1)


def _number(kind, check, what):
    """An argparse type: text -> kind(text) where check holds, else one line saying `what` it must be."""
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed = _number(int, lambda v: 0 <= v < 2**63, "a seed in [0, 2^63)")
positive_float = _number(float, lambda v: 0 < v < FLOAT32_MAX, "a finite number > 0")
non_negative_float = _number(float, lambda v: 0 <= v < FLOAT32_MAX, "a finite number >= 0")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
finite_float = _number(float, math.isfinite, "a finite number")
dropout = _number(float, lambda v: 0 <= v < 1, "a dropout probability in [0, 1)")
cap = _number(float, lambda v: v == 0 or 1 <= v < FLOAT32_MAX, "0 (off) or a cap >= 1")


def _schedule_fits(steps):
    """A T whose linear schedule (rescaled from DiT's T = 1000) keeps every beta in (0, 1): beta_T =
    0.02 * 1000 / T is 1 at T = 20, and beta = 1 leaves alpha_bar = 0, a 1/0 in the maths."""
    betas = get_named_beta_schedule("linear", steps) if 1 <= steps <= MAX_DIFFUSION_STEPS else None
    return betas is not None and bool(((betas > 0) & (betas < 1)).all())


diffusion_steps = _number(int, _schedule_fits, "a diffusion length the linear schedule can take (1, or 21 "
                          f"to {MAX_DIFFUSION_STEPS}; DiT's is 1000)")


def step_list(text):
    """Comma-separated positive steps, e.g. "10000,50000"; returned as given (it is saved as text)."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive steps "
                                         "(e.g. 10000,50000)")
    return text


def step_set(text):
    """Comma-separated positive steps, e.g. "10000,50000", as a set of ints."""
    return {int(part) for part in step_list(text).split(",") if part.strip()}


def seed_list(text):
    """Comma-separated seeds, e.g. "0,1,2", as a list without repeats (every --seeds is a list)."""
    try:
        return list(dict.fromkeys(seed(part.strip()) for part in str(text).split(",") if part.strip())) \
            or seed("")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds (e.g. 0,1,2)") \
            from None


def device(text):
    """cpu, cuda or cuda:N, as text; whether this machine has it is check_device's question."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda") or (parsed.type == "cpu" and parsed.index):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N")
    return text


def add_fast_flag(parser):
    parser.add_argument("--fast", choices=("auto", "off"), default="auto",
                        help="auto: use the fast path (fast/) once it has been checked against models.py and "
                        "diffusion/ as they are; off: always the plain research code (default: auto)")


def add_training_flags(parser, defaults, models=TOY_MODELS):
    """The trainer's flags. defaults: the value shown in --help for each; the flags themselves default to
    None, so that the caller can tell a flag given from one left out."""

    def add(flag, help, **kwargs):
        shown = defaults.get(flag[2:].replace("-", "_"))
        parser.add_argument(flag, default=None, help=help + (f" (default: {shown})" if shown not in (None, "")
                                                             else ""), **kwargs)

    add("--model", "a model of models.py", choices=models)
    add("--norm", "normalisation in every block", choices=NORM_KINDS)
    add("--recipe", "a training recipe of ditnorm/recipes.py, the values below at once (explicit flags win; "
        "cpu: batch 256, lr 1e-3, EMA 0.999, 5000 steps, a checkpoint every 1000: the effect of the norm on "
        "a 2-core CPU in minutes, at a noisier, less converged, non-DiT recipe)", choices=sorted(RECIPES))
    add("--global-batch-size", "samples per step summed over all ranks", type=positive_int)
    add("--lr", "constant AdamW learning rate", type=positive_float)
    add("--ema-decay", "decay of the EMA that DiT samples with", type=unit_interval)
    add("--max-steps", "train until this step", type=positive_int)
    add("--seed", "model initialisation and every draw of training", type=seed)
    add("--ckpt-steps", "comma-separated steps to save a checkpoint at; the last step is always saved",
        type=step_list)
    add("--ckpt-every", "also save every N steps; 0 = off", type=non_negative_int)
    add("--log-every", "steps between loss logs; the loss is also checked for NaN/Inf here",
        type=positive_int)
    add("--diffusion-steps", "diffusion timesteps T (linear schedule, learned sigma)", type=diffusion_steps)
    # The study's interventions, all off (0) in DiT's recipe.
    add("--weight-decay", "AdamW's decoupled weight decay on every parameter; over a run it shrinks the "
        "weights by exp(-lr * decay * steps)", type=non_negative_float)
    add("--dropout", "dropout in every attention and MLP", type=dropout)
    add("--cap", "clamp each block's output to this many times its token's RMS, so that no channel can grow "
        "large; 0 = off", type=cap)
    parser.add_argument("--device", type=device,
                        help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")


def add_image_size_flag(parser):
    parser.add_argument("--image-size", type=positive_int, help="with --data-path: the side the images are "
                        "resized and centre-cropped to, a multiple of the model's patch size (default: 28)")


def check_device(text):
    """None if this machine has the device `text` (cpu, cuda, cuda:N), else what to pass instead."""
    wanted, count = torch.device(text), torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted.type == "cuda" and not count:
        return "CUDA is not available here; use --device cpu"
    if wanted.type == "cuda" and wanted.index is not None and wanted.index >= count:
        return f"this machine has {count} CUDA device(s); use cuda:0 .. cuda:{count - 1}"
    return None


def check_folder(path):
    """None if `path` is a folder, or can become one, that this process can write into; else why not."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        return f"{existing} is a file, not a folder; pass a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written (permission denied); pass a folder you can write to"
    return None


def check_output_file(path):
    """None if a file can be written at `path` (its folder may not exist yet), else why not."""
    return f"{path} is a folder; pass a file name" if Path(path).is_dir() else check_folder(Path(path).parent)
