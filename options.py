"""Command-line pieces shared by train_toy.py, study.py, paper.py and sample.py: one definition per flag.

Every value is checked where it enters: the argparse `type` functions below turn a bad value into one
line that says what to do (exit status 2), before any work starts.
"""

import argparse
import math
import os

from fast import FAST_CHOICES
from models import NORM_KINDS, TOY_MODELS


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
        quiet = int(os.environ.get("RANK", "0")) != 0
        self.exit(2, None if quiet else f"{self.prog}: error: {message}\n")


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


def add_fast_flag(parser):
    parser.add_argument("--fast", choices=FAST_CHOICES, default="auto",
                        help="auto: use the fast path (fast/) once it has been checked against models.py and "
                        "diffusion/ as they are; off: always the plain research code (default: auto)")


def add_training_flags(parser, defaults, *, suppress=False):
    """--model, --norm, --global-batch-size, --lr, --ema-decay, --max-steps, --seed, --device: train_toy.py's
    definitions. defaults: the value shown in --help for each; the flags themselves default to None, so
    that the caller can tell a flag given from one left out (suppress: no default shown)."""

    def add(flag, help, **kwargs):
        key = flag[2:].replace("-", "_")
        shown = "" if suppress or key not in defaults else f" (default: {defaults[key]})"
        parser.add_argument(flag, default=None, help=help + shown, **kwargs)

    add("--model", "a toy model of models.py", choices=TOY_MODELS)
    add("--norm", "normalisation in every block", choices=NORM_KINDS)
    add("--global-batch-size", "samples per step summed over all ranks", type=positive_int)
    add("--lr", "constant AdamW learning rate, no weight decay", type=positive_float)
    add("--ema-decay", "decay of the EMA that DiT samples with", type=unit_interval)
    add("--max-steps", "train until this step", type=positive_int)
    add("--seed", "model initialisation and every draw of training", type=seed)
    parser.add_argument("--device",
                        help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
