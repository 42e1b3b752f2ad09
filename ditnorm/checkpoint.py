"""The one way to build a model from a checkpoint (load_model, load_for_sampling, load_weights_kinds).

It reads this repository's checkpoints (FORMAT: the model config, norm included, travels inside), the
official published ones (a plain state dict), the official train.py's ({"model", "ema", "opt", "args"}),
shipped .safetensors weights and diffusers DiT folders (hub.py); official ones are LayerNorm DiTs whose
architecture comes from their tensor shapes. Reading and writing the files is files.py's (docs/usage.md).
"""

import os
import re
from pathlib import Path

import torch

from diffusion import create_diffusion
from ditnorm import hub
from ditnorm.averaging import read_out
from ditnorm.files import (  # noqa: F401  (FORMAT, DownloadError, save_checkpoint: the public face here too)
    DIT_KWARGS,
    FORMAT,
    INTERVENTION_KWARGS,
    CheckpointError,
    DownloadError,
    first_line,
    nonfinite_parts,
    read_checkpoint,
    save_checkpoint,
)
from ditnorm.records import temp_file
from models import NORM_KINDS, TOY_MODELS, DiT, DiT_models

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
OFFICIAL_CHECKPOINTS = {name: (size, OFFICIAL_URL.format(name=name))
                        for name, size in (("DiT-XL-2-256x256.pt", 256), ("DiT-XL-2-512x512.pt", 512))}
# The types a checkpoint's config must hold (checked before a model is built from it); the interventions'
# (INTERVENTION_KWARGS) only when it holds them, as checkpoints from before them do not.
CONFIG_TYPES = {"model": str, "input_size": int, "patch_size": int, "in_channels": int, "hidden_size": int,
                "depth": int, "num_heads": int, "mlp_ratio": (int, float), "class_dropout_prob": (int, float),
                "num_classes": int, "learn_sigma": bool, "norm": str,
                **dict.fromkeys(INTERVENTION_KWARGS, (int, float))}


def _fetch(url, dst):
    """Download url to dst (a separate function so tests can replace it; they never touch the network)."""
    torch.hub.download_url_to_file(url, str(dst), progress=True)


def download_official(name, root="pretrained_models") -> Path:
    """Path of the official checkpoint `name` under root, downloading it first if it is not there."""
    if name not in OFFICIAL_CHECKPOINTS:
        raise CheckpointError(f"{name} is not an official checkpoint; choose one of: "
                              f"{', '.join(OFFICIAL_CHECKPOINTS)}")
    dest, url = Path(root) / name, OFFICIAL_CHECKPOINTS[name][1]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(dest.parent, name, ".part")
    os.close(fd)
    try:
        _fetch(url, tmp)
        os.replace(tmp, dest)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        raise DownloadError(f"download of {url} failed ({first_line(e)}); download it manually to "
                            f"{dest}") from e
    return dest


def _resolve(path_or_name, download) -> Path:
    """A checkpoint file for a path, or for an official name (downloaded when missing and allowed)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    local = Path("pretrained_models") / path.name
    if path.name in OFFICIAL_CHECKPOINTS and str(path_or_name) in (path.name, str(local)):
        if local.is_file() or download:
            return download_official(path.name)
        raise CheckpointError(f"{local} not found; allow the download or fetch "
                              f"{OFFICIAL_CHECKPOINTS[path.name][1]} to that path")
    raise CheckpointError(f"{path_or_name} not found; pass a path to a checkpoint or one of "
                          f"{', '.join(OFFICIAL_CHECKPOINTS)}")


def infer_official_config(state_dict, args=None) -> dict:
    """DiT kwargs plus registry name of an official-layout state dict, from its tensor shapes (and args)."""
    try:
        hidden_size, in_channels, patch_size = state_dict["x_embedder.proj.weight"].shape[:3]  # (D, C, p, p)
        num_tokens = state_dict["pos_embed"].shape[1]
        table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        out_features = state_dict["final_layer.linear.weight"].shape[0]  # p * p * C_out
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, AttributeError, ValueError) as e:
        raise CheckpointError(f"not a DiT state dict (no proper {e}); pass a DiT checkpoint") from None
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    # Official training always uses class dropout 0.1, i.e. one extra "null" row; args.num_classes
    # (training format) settles it, a bare state dict with more than one row is taken to follow it.
    num_classes = getattr(args, "num_classes", None) or (table_rows - 1 if table_rows > 1 else table_rows)
    config = dict(
        input_size=round(num_tokens**0.5) * patch_size, patch_size=patch_size, in_channels=in_channels,
        hidden_size=hidden_size, depth=depth, mlp_ratio=mlp_hidden / hidden_size,
        class_dropout_prob=0.1 if table_rows == num_classes + 1 else 0.0, num_classes=num_classes,
        learn_sigma=out_features == patch_size * patch_size * in_channels * 2, norm="layernorm",
    )
    # num_heads leaves no trace in the shapes: take it from the registry entry with this architecture.
    same = [n for n, build in DiT_models.items()
            if all(build.arch[k] == config[k] for k in ("depth", "hidden_size", "patch_size"))]
    name = getattr(args, "model", None)
    name = name if name in DiT_models else next(iter(same), None)
    if name not in same:
        raise CheckpointError(f"no registry model has depth {depth}, hidden size {hidden_size} and patch "
                              f"size {patch_size}; add one to DiT_models in models.py")
    return {"model": name, **config, "num_heads": DiT_models[name].arch["num_heads"]}


def _tensors(state_dict, source, part):
    """state_dict if it maps names to tensors, else CheckpointError naming the part of source."""
    if not (isinstance(state_dict, dict) and all(isinstance(k, str) and torch.is_tensor(v)
                                                 for k, v in state_dict.items())):
        raise CheckpointError(f"{source}: its {part} weights are no state dict (names to tensors); pass a "
                              "checkpoint written by train_toy.py")
    return state_dict


def _unpack(checkpoint, weights, norm=None, source="the checkpoint"):
    """(config with "model" name, state dict) of a checkpoint in any of the three formats.

    weights: "ema", "raw" or the label of a saved average (averaging.py; this repository's format only).
    norm: the norm of a plain state dict that is no official architecture (which does not store it)."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a checkpoint's dict; "
                              "pass a DiT checkpoint")
    if checkpoint.get("format") == FORMAT:
        if weights == "ema" and checkpoint.get("ema") is None:
            weights = "raw"  # the EMA falls back to the raw weights when there is none
        lacking = [key for key in ("config", "ema" if weights == "ema" else "model")
                   if not isinstance(checkpoint.get(key), dict)]
        if lacking:
            raise CheckpointError(f"{source} lacks its {' and '.join(lacking)}; pass a complete checkpoint "
                                  "written by train_toy.py")
        config = dict(checkpoint["config"])
        missing = [k for k in ("model", *DIT_KWARGS) if k not in config]
        if missing:  # guessing e.g. the norm would silently compute another function than the one trained
            raise CheckpointError(f"{source}: checkpoint config lacks {', '.join(missing)}; re-save it with "
                                  "the full model.config")
        wrong = [k for k, kinds in CONFIG_TYPES.items() if k in config and (
            not isinstance(config[k], kinds) or isinstance(config[k], bool) != (kinds is bool))]
        if wrong:
            raise CheckpointError(f"{source}: checkpoint config holds {', '.join(wrong[:3])} of the wrong "
                                  "type; pass a checkpoint written by train_toy.py")
        if weights in ("ema", "raw"):
            part = "ema" if weights == "ema" else "model"
            return config, _tensors(checkpoint[part], source, part)
        averages = checkpoint.get("averages") or {}
        if not isinstance(averages, dict) or not isinstance(averages.get(weights, {}), dict):
            raise CheckpointError(f"{source} holds averages that are no dicts; pass a checkpoint written by "
                                  "train_toy.py")
        if weights not in averages:
            saved = ", ".join(["ema", "raw", *averages])
            raise CheckpointError(f"this checkpoint holds no {weights!r} weights; choose one of: {saved}")
        tensors = _tensors(averages[weights].get("tensors"), source, weights)
        average = {**averages[weights], "tensors": tensors}
        return config, read_out(average, _tensors(checkpoint["model"], source, "model"))
    if weights not in ("ema", "raw"):
        raise CheckpointError(f"an official checkpoint holds no {weights!r} weights; use ema or raw")
    if "x_embedder.proj.weight" in checkpoint:  # a plain state dict: official published, or a model's own
        if not all(torch.is_tensor(v) for v in checkpoint.values()):
            raise CheckpointError(f"{source} holds non-tensor values beside its weights; pass a state dict")
        config = infer_official_config(checkpoint)
        official = (config["model"] not in TOY_MODELS and config["in_channels"] == 4 and config["learn_sigma"]
                    and config["mlp_ratio"] == 4.0)  # the official code's: SD latents, so layernorm
        if not official:  # e.g. a toy model's state_dict(): its norm leaves no trace in the keys
            if norm is None:
                raise CheckpointError(
                    f"{source} is a plain state dict of a {config['model']} model, no official DiT "
                    f"architecture, so its norm is not known; give it (load_model(norm=...), "
                    f"sample.py --norm), one of {', '.join(NORM_KINDS)}")
            config["norm"] = norm
        return config, checkpoint
    if isinstance(checkpoint.get("model"), dict) and "args" in checkpoint:  # official training script
        key = "ema" if weights == "ema" and isinstance(checkpoint.get("ema"), dict) else "model"
        state_dict = _tensors(checkpoint[key], source, key)
        return infer_official_config(state_dict, checkpoint["args"]), state_dict
    keys = ", ".join(map(str, list(checkpoint)[:6]))
    raise CheckpointError(f"{source} is no checkpoint this code reads (top-level keys: {keys}); expected the "
                          f"{FORMAT} format or an official DiT checkpoint")


def _check_keys(model, state_dict, source):
    """Raise CheckpointError naming the first mismatching keys, instead of load_state_dict's traceback."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}" for label, items in (
        ("missing", [k for k in expected if k not in found]),
        ("unexpected", [k for k in found if k not in expected]),
        ("wrong shape", [f"{k} {found[k]} vs {expected[k]}" for k in expected if k in found
                         and found[k] != expected[k]])) if items]
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({'; '.join(problems)}); pass a matching "
                              "checkpoint")


def _build(path, config, state_dict, *, why="", norm=None, model=None, device="cpu"):
    """(model in eval mode, its config + "model" name) of a config and state dict read from path; norm and
    model, when given, are checks (why: how the norm is known when the checkpoint does not say it)."""
    if norm is not None and norm != config["norm"]:
        raise CheckpointError(f"{path} holds a norm={config['norm']} model{why}, not norm={norm}; drop the "
                              f"norm request or pass a checkpoint trained with norm={norm}")
    if model is not None and model != config["model"]:
        raise CheckpointError(f"{path} holds a {config['model']} model, not {model}; drop the model request "
                              f"or pass a {model} checkpoint")
    kwargs = {k: config[k] for k in DIT_KWARGS}
    kwargs.update({k: config.get(k, off) for k, off in INTERVENTION_KWARGS.items()})
    try:  # on the meta device, adopting the checkpoint's tensors: no random init of a 675M model
        with torch.device("meta"):
            net = DiT(**kwargs)
    except ValueError as e:  # e.g. a norm kind this version of models.py does not know
        raise CheckpointError(f"{path} needs a model this code cannot build ({e})") from None
    _check_keys(net, state_dict, path)
    net.load_state_dict(state_dict, strict=True, assign=True)
    net = net.to(device).eval()
    return net, {**net.config, "model": config["model"]}


def load_for_sampling(path_or_name, *, norm=None, model=None, use_ema=True, weights=None, device="cpu",
                      download=True):
    """(model in eval mode, model.config + {"model": name}, the checkpoint's train_args: {} for an official
    one) of any checkpoint, diffusers folder (or hub id "org/name" of one) or official name.

    weights: "ema", "raw" or a saved average's label (averaging.py); None means use_ema's choice. norm and
    model, when given, are checks: a checkpoint of another kind raises CheckpointError instead of silently
    computing another function (norm changes no state-dict key)."""
    folder = hub.diffusers_folder(path_or_name, download)  # a diffusers DiT folder (local or hub id), or None
    if folder is not None:  # one set of weights (use_ema does not apply)
        if weights not in (None, "ema"):
            raise CheckpointError(f"{folder} is a diffusers folder: it holds one set of weights, not "
                                  f"{weights!r}; drop the weights request")
        config, state_dict = hub.read_diffusers_dit(folder)
        why = " (a diffusers DiT: layernorm by definition)"
        return (*_build(folder, config, state_dict, why=why, norm=norm, model=model, device=device), {})
    path = _resolve(path_or_name, download)
    checkpoint = read_checkpoint(path)
    config, state_dict = _unpack(checkpoint, weights or ("ema" if use_ema else "raw"), norm=norm, source=path)
    ours = checkpoint.get("format") == FORMAT
    why = "" if ours else " (an official DiT architecture: layernorm by definition)"
    train_args = checkpoint.get("train_args") if ours else None
    return (*_build(path, config, state_dict, why=why, norm=norm, model=model, device=device),
            dict(train_args) if isinstance(train_args, dict) else {})


def load_model(path_or_name, **kwargs) -> tuple[DiT, dict]:
    """(model in eval mode, model.config + {"model": name}): load_for_sampling without the train_args."""
    return load_for_sampling(path_or_name, **kwargs)[:2]


def load_weights_kinds(path, weights, *, device="cpu"):
    """({kind: model} for each weights kind in `weights`, config, train_args) of one of our checkpoints,
    read from disk once (a measurement of every average would otherwise read the file once per kind)."""
    checkpoint = read_checkpoint(path)
    models = {}
    for kind in weights:
        models[kind], built = _build(path, *_unpack(checkpoint, kind, source=path), device=device)
    train_args = checkpoint.get("train_args") if isinstance(checkpoint, dict) else None
    return models, built, dict(train_args) if isinstance(train_args, dict) else {}


def diffusion_of(train_args, num_sampling_steps=None):
    """The diffusion a checkpoint was trained with, respaced to num_sampling_steps (None: all its steps).

    train_args["diffusion_steps"]: T of the linear schedule (load_for_sampling returns train_args); the
    official checkpoints, and ours from before that flag, are DiT's T = 1000. CheckpointError when
    num_sampling_steps does not fit T."""
    steps = train_args.get("diffusion_steps", 1000)
    if not isinstance(steps, int) or steps < 1:
        raise CheckpointError(f"the checkpoint's train_args hold diffusion_steps {steps!r}, not a step "
                              "count; pass a checkpoint written by train_toy.py")
    num_sampling_steps = steps if num_sampling_steps is None else num_sampling_steps
    if not 1 <= num_sampling_steps <= steps:
        raise CheckpointError(f"this checkpoint's diffusion: {num_sampling_steps} sampling steps do not fit "
                              f"a {steps}-step diffusion; pass 1 to {steps}")
    return create_diffusion(str(num_sampling_steps), diffusion_steps=steps)
