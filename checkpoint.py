"""The one way to save checkpoints and to build a model from one.

Three formats are read, always with torch.load(weights_only=True):
- this repository's own: {"format": "dit-norm-study/1", "config": {"model": name, **DiT kwargs}, "model",
  "ema", "opt", "step", "train_args", "rng"}; the config (norm included) comes from the checkpoint;
- the official published checkpoints: a plain state dict;
- the official training script's: {"model", "ema", "opt", "args"} with an argparse.Namespace as args;
- a diffusers DiTTransformer2DModel folder (config.json + safetensors), read by diffusers_io.py.
Official checkpoints are norm="layernorm" by definition; their architecture is inferred from tensor shapes.
"""

import argparse
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from averaging import read_out
from models import DiT, DiT_models

FORMAT = "dit-norm-study/1"
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
OFFICIAL_CHECKPOINTS = {
    "DiT-XL-2-256x256.pt": (256, OFFICIAL_URL.format(name="DiT-XL-2-256x256.pt")),
    "DiT-XL-2-512x512.pt": (512, OFFICIAL_URL.format(name="DiT-XL-2-512x512.pt")),
}
DIT_KWARGS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
              "class_dropout_prob", "num_classes", "learn_sigma", "norm")


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the request; the message says what to do."""


def _first_line(error):
    """The first line of an exception's message (PyTorch's are often many lines long)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def save_checkpoint(obj: dict, path) -> None:
    """Write obj atomically: a temporary file in the same folder, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A crash mid-write must never leave a truncated file under the real name, nor litter the folder.
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path) -> dict:
    """torch.load on CPU with weights_only=True; only argparse.Namespace (official args) is allow-listed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # PyTorch's message is a paragraph; the one fact worth a line is which global it refused.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(
                f"{path} holds a {refused.group(1)} object, not plain data; re-save it with tensors, "
                "numbers, strings and dicts only"
            ) from None
        raise CheckpointError(f"cannot read {path} (not a PyTorch checkpoint); pass a complete one") from None
    except (RuntimeError, EOFError, OSError) as e:
        reason = _first_line(e)
        raise CheckpointError(f"cannot read {path} ({reason}); pass a complete PyTorch checkpoint") from None


def _fetch(url, dst):
    """Download url to dst (a separate function so tests can replace it; they never touch the network)."""
    torch.hub.download_url_to_file(url, str(dst), progress=True)


def download_official(name, root="pretrained_models") -> Path:
    """Path of the official checkpoint `name` under root, downloading it first if it is not there."""
    if name not in OFFICIAL_CHECKPOINTS:
        choices = ", ".join(OFFICIAL_CHECKPOINTS)
        raise CheckpointError(f"{name} is not an official checkpoint; choose one of: {choices}")
    dest = Path(root) / name
    if dest.is_file():
        return dest
    url = OFFICIAL_CHECKPOINTS[name][1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    try:
        _fetch(url, tmp)
        os.replace(tmp, dest)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        reason = _first_line(e)
        raise CheckpointError(f"download of {url} failed ({reason}); download it manually to {dest}") from e
    return dest


def _resolve(path_or_name, download) -> Path:
    """A checkpoint file for a path, or for an official name (downloaded when missing and allowed)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name
    if name in OFFICIAL_CHECKPOINTS and str(path_or_name) in (name, str(Path("pretrained_models") / name)):
        local = Path("pretrained_models") / name
        if local.is_file():
            return local
        if not download:
            url = OFFICIAL_CHECKPOINTS[name][1]
            raise CheckpointError(f"{local} not found; allow the download or fetch {url} to that path")
        return download_official(name)
    raise CheckpointError(
        f"{path_or_name} not found; pass a path to a checkpoint or one of {', '.join(OFFICIAL_CHECKPOINTS)}"
    )


def infer_official_config(state_dict, args=None) -> dict:
    """DiT kwargs plus registry name of an official-layout state dict, from its tensor shapes (and args)."""
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden_size, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
        num_tokens = state_dict["pos_embed"].shape[1]
        table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        out_features = state_dict["final_layer.linear.weight"].shape[0]  # p * p * C_out
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"not a DiT state dict (no proper {e}); pass a DiT checkpoint") from None
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    grid = round(num_tokens**0.5)
    # Official training always uses class dropout 0.1, i.e. one extra "null" row; args.num_classes
    # (training format) settles it, a bare state dict with more than one row is taken to follow it.
    num_classes = getattr(args, "num_classes", None) or (table_rows - 1 if table_rows > 1 else table_rows)
    class_dropout_prob = 0.1 if table_rows == num_classes + 1 else 0.0
    config = dict(
        input_size=grid * patch_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
        depth=depth, mlp_ratio=mlp_hidden / hidden_size, class_dropout_prob=class_dropout_prob,
        num_classes=num_classes, learn_sigma=out_features == patch_size * patch_size * in_channels * 2,
        norm="layernorm",
    )
    # num_heads leaves no trace in the shapes: take it from the registry entry with this architecture.
    name = getattr(args, "model", None)
    if name not in DiT_models:
        name = next((n for n, build in DiT_models.items() if _same_arch(build.arch, config)), None)
    if name is None or not _same_arch(DiT_models[name].arch, config):
        raise CheckpointError(
            f"no registry model has depth {depth}, hidden size {hidden_size} and patch size {patch_size}; "
            "add one to DiT_models in models.py"
        )
    config["num_heads"] = DiT_models[name].arch["num_heads"]
    return {"model": name, **config}


def _same_arch(arch, config):
    """Whether a registry entry's architecture (depth, width, patch size) matches config."""
    return all(arch[k] == config[k] for k in ("depth", "hidden_size", "patch_size"))


def _unpack(checkpoint, use_ema, weights=None):
    """(config with "model" name, state dict) of a checkpoint in any of the three formats.

    weights (this repository's format only): "ema", "raw" or the label of a saved average (averaging.py);
    None: "ema" if use_ema else "raw"."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict, found {type(checkpoint).__name__}; pass a DiT checkpoint")
    if checkpoint.get("format") == FORMAT:
        config = dict(checkpoint["config"])
        missing = [k for k in ("model", *DIT_KWARGS) if k not in config]
        if missing:
            # Guessing e.g. the norm would silently compute a different function than the one trained.
            missing = ", ".join(missing)
            raise CheckpointError(f"checkpoint config lacks {missing}; re-save it with the full model.config")
        weights = weights or ("ema" if use_ema else "raw")
        if weights == "raw" or (weights == "ema" and checkpoint.get("ema") is None):
            return config, checkpoint["model"]
        if weights == "ema":
            return config, checkpoint["ema"]
        averages = checkpoint.get("averages") or {}
        if weights not in averages:
            saved = ", ".join(["ema", "raw", *averages])
            raise CheckpointError(f"this checkpoint holds no {weights!r} weights; choose one of: {saved}")
        return config, read_out(averages[weights], checkpoint["model"])
    if weights not in (None, "ema", "raw"):
        raise CheckpointError(f"an official checkpoint holds no {weights!r} weights; use ema or raw")
    if "x_embedder.proj.weight" in checkpoint:  # official published: a plain (EMA) state dict
        return infer_official_config(checkpoint), checkpoint
    if isinstance(checkpoint.get("model"), dict) and "args" in checkpoint:  # official training script
        wants_ema = (weights or ("ema" if use_ema else "raw")) == "ema"
        key = "ema" if wants_ema and isinstance(checkpoint.get("ema"), dict) else "model"
        return infer_official_config(checkpoint[key], checkpoint["args"]), checkpoint[key]
    raise CheckpointError(
        f"unrecognised checkpoint (top-level keys: {', '.join(map(str, list(checkpoint)[:6]))}); "
        f"expected the {FORMAT} format or an official DiT checkpoint"
    )


def _check_keys(model, state_dict, source):
    """Raise CheckpointError naming the first mismatching keys, instead of load_state_dict's traceback."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    problems = [
        f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if items
    ]
    if problems:
        problems = "; ".join(problems)
        raise CheckpointError(f"{source} does not fit the model ({problems}); pass a matching checkpoint")


def load_model(
    path_or_name, *, norm=None, model=None, use_ema=True, weights=None, device="cpu", download=True
) -> tuple[DiT, dict]:
    """Build the model stored in a checkpoint; returns (model in eval mode, model.config + {"model": name}).

    weights: "ema", "raw" or a saved average's label (see averaging.py); None means use_ema's choice.

    norm / model, when given, are checks: a checkpoint of another kind raises CheckpointError instead of
    silently computing a different function (norm changes no state-dict key). A folder written by diffusers'
    DiTTransformer2DModel.save_pretrained (or a hub id "org/name" of one) loads too, as the official DiT
    function (diffusers_io.py; use_ema does not apply there).
    """
    from diffusers_io import diffusers_folder, read_diffusers_dit  # late: diffusers_io builds on this module

    folder = diffusers_folder(path_or_name, download)  # a diffusers DiT folder (local or hub id), or None
    if folder is not None:
        if weights not in (None, "ema"):
            raise CheckpointError(f"{folder} is a diffusers folder: it holds one set of weights, not "
                                  f"{weights!r}; drop the weights request")
        path = folder
        config, state_dict = read_diffusers_dit(folder)
    else:
        path = _resolve(path_or_name, download)
        config, state_dict = _unpack(read_checkpoint(path), use_ema, weights)
    if norm is not None and norm != config["norm"]:
        raise CheckpointError(
            f"{path} holds a norm={config['norm']} model, not norm={norm}; drop the norm request or pass "
            f"a checkpoint trained with norm={norm}"
        )
    if model is not None and model != config["model"]:
        raise CheckpointError(
            f"{path} holds a {config['model']} model, not {model}; drop the model request or pass "
            f"a {model} checkpoint"
        )
    kwargs = {k: config[k] for k in DIT_KWARGS}
    # Build on the meta device and adopt the checkpoint's tensors: no random init of a 675M model.
    try:
        with torch.device("meta"):
            net = DiT(**kwargs)
    except ValueError as e:  # e.g. a norm kind this version of models.py does not know
        raise CheckpointError(f"{path} needs a model this code cannot build ({e})") from None
    _check_keys(net, state_dict, path)
    net.load_state_dict(state_dict, strict=True, assign=True)
    net = net.to(device).eval()
    return net, {**net.config, "model": config["model"]}
