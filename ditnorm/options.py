"""Command-line pieces shared by train_toy.py, sample.py and experiment.py: one definition per flag.

Every value is checked where it enters: the argparse `type` functions below turn a bad value into one
line that says what to do (exit status 2), before any work starts; the checks that need more than one
value (sampling steps against the diffusion's, a device against the machine, a folder against the disk)
are the functions at the end, which return what is wrong (or None) for the caller's parser.error.
"""

import argparse
import math
import os
from pathlib import Path

import torch

from diffusion import get_named_beta_schedule
from models import NORM_KINDS, TOY_MODELS

# --fast: the plain research code or the checked fast path of fast/ (the trainer's make_train_step and
# fast.sample_toy take the same two values).
FAST_CHOICES = ("auto", "off")
# Longer than this is no setting of the study (DiT: 1000); the schedule's arrays grow with T.
MAX_DIFFUSION_STEPS = 100_000


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of the scripts: their docstring examples as written, and each default the help does not give."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter that reports a user error as one line (no usage block), printed by
    rank 0 only under torchrun."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """A usage error: one line, exit status 2."""
        quiet = int(os.environ.get("RANK", "0")) != 0
        self.exit(2, None if quiet else f"{self.prog}: error: {message}\n")

    def fail(self, message):
        """A failure of a valid request (a write, a download): one line, exit status 1."""
        quiet = int(os.environ.get("RANK", "0")) != 0
        self.exit(1, None if quiet else f"{self.prog}: error: {message}\n")


def _number(kind, text, check, what):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not check(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text):
    return _number(int, text, lambda v: v > 0, "a positive integer")


def non_negative_int(text):
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def seed(text):
    return _number(int, text, lambda v: 0 <= v < 2**63, "a seed in [0, 2^63)")


def positive_float(text):
    """A finite float > 0 that stays finite in float32 (a learning rate of 1e39 is inf there)."""
    return _number(float, text, lambda v: 0 < v < 3.4e38 and math.isfinite(v), "a finite number > 0")


def unit_interval(text):
    return _number(float, text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def finite_float(text):
    return _number(float, text, math.isfinite, "a finite number")


def diffusion_steps(text):
    """A T whose linear schedule (rescaled from DiT's T = 1000) keeps every beta below 1: T = 1 or T > 20."""
    def fits(steps):
        if not 1 <= steps <= MAX_DIFFUSION_STEPS:
            return False
        betas = get_named_beta_schedule("linear", steps)  # beta_T = 0.02 * 1000 / T: 1 at T = 20
        return bool(((betas > 0) & (betas < 1)).all())  # beta = 1 leaves alpha_bar = 0: 1/0 in the maths

    return _number(int, text, fits, f"a diffusion length the linear schedule can take (1, or 21 to "
                   f"{MAX_DIFFUSION_STEPS}; DiT's is 1000)")


def step_list(text):
    """Comma-separated positive steps, e.g. "10000,50000"; returned as given (it is saved as text)."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive steps "
                                         "(e.g. 10000,50000)")
    return text


def seed_list(text):
    """Comma-separated seeds, e.g. "0,1,2", as a list without repeats (every --seeds is a list)."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    try:
        return list(dict.fromkeys(seed(part) for part in parts)) or seed("")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds (e.g. 0,1,2)") \
            from None


def step_set(text):
    """Comma-separated positive steps, e.g. "10000,50000", as a set of ints."""
    return {int(part) for part in step_list(text).split(",") if part.strip()}


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
    parser.add_argument("--fast", choices=FAST_CHOICES, default="auto",
                        help="auto: use the fast path (fast/) once it has been checked against models.py and "
                        "diffusion/ as they are; off: always the plain research code (default: auto)")


def add_training_flags(parser, defaults, models=TOY_MODELS):
    """--model, --norm, --global-batch-size, --lr, --ema-decay, --max-steps, --seed, --device: train_toy.py's
    definitions. defaults: the value shown in --help for each; the flags themselves default to None, so
    that the caller can tell a flag given from one left out."""

    def add(flag, help, **kwargs):
        key = flag[2:].replace("-", "_")
        shown = "" if key not in defaults else f" (default: {defaults[key]})"
        parser.add_argument(flag, default=None, help=help + shown, **kwargs)

    add("--model", "a model of models.py", choices=models)
    add("--norm", "normalisation in every block", choices=NORM_KINDS)
    add("--global-batch-size", "samples per step summed over all ranks", type=positive_int)
    add("--lr", "constant AdamW learning rate", type=positive_float)
    add("--ema-decay", "decay of the EMA that DiT samples with", type=unit_interval)
    add("--max-steps", "train until this step", type=positive_int)
    add("--seed", "model initialisation and every draw of training", type=seed)
    parser.add_argument("--device", type=device,
                        help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")


def non_negative_float(text):
    return _number(float, text, lambda v: 0 <= v < 3.4e38 and math.isfinite(v), "a finite number >= 0")


def dropout(text):
    return _number(float, text, lambda v: 0 <= v < 1, "a dropout probability in [0, 1)")


def cap(text):
    return _number(float, text, lambda v: v == 0 or 1 <= v < 3.4e38, "0 (off) or a cap >= 1")


def add_intervention_flags(parser):
    """--weight-decay, --dropout, --cap: the study's interventions, off (0) unless given."""
    parser.add_argument("--weight-decay", type=non_negative_float, help="AdamW's decoupled weight decay on "
                        "every parameter; over a run it shrinks the weights by exp(-lr * decay * steps) "
                        "(default: 0, DiT's)")
    parser.add_argument("--dropout", type=dropout, help="dropout in every attention and MLP (default: 0)")
    parser.add_argument("--cap", type=cap, help="clamp each block's output to this many times its token's "
                        "RMS, so that no channel can grow large; 0 = off (default: 0)")


def check_device(text):
    """None if this machine has the device `text` (cpu, cuda, cuda:N), else what to pass instead."""
    wanted = torch.device(text)
    if wanted.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available here; use --device cpu"
    if wanted.index is not None and wanted.index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. cuda:" \
               f"{torch.cuda.device_count() - 1}"
    return None


def check_timestep(timestep, num_timesteps):
    """None if `timestep` is one of a num_timesteps-step diffusion's (0 .. T-1), else what to pass."""
    if not 0 <= timestep < num_timesteps:
        return f"{timestep} is no timestep of a {num_timesteps}-step diffusion; pass 0 to {num_timesteps - 1}"
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
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder; pass a file name"
    return check_folder(path.parent)
