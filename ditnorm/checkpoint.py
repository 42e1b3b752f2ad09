"""The one way to save checkpoints and to build a model from one.

Three formats are read, always with torch.load(weights_only=True):
- this repository's own: {"format": "dit-norm-study/1", "config": {"model": name, **DiT kwargs}, "model",
  "ema", "opt", "step", "train_args", "rng"}; the config (norm included) comes from the checkpoint;
- the official published checkpoints: a plain state dict;
- the official training script's: {"model", "ema", "opt", "args"} with an argparse.Namespace as args;
- a diffusers DiTTransformer2DModel folder (config.json + safetensors), read by hub.py.
Official checkpoints are norm="layernorm" by definition; their architecture is inferred from tensor shapes.
A plain state dict of another architecture (a toy model's `state_dict()`) does not say its norm: the
caller gives it. The diffusion a checkpoint samples with is the one it was trained with (`diffusion_of`).

Reading and writing the files themselves (read_checkpoint, save_checkpoint, CheckpointError) is files.py's.
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
OFFICIAL_CHECKPOINTS = {
    "DiT-XL-2-256x256.pt": (256, OFFICIAL_URL.format(name="DiT-XL-2-256x256.pt")),
    "DiT-XL-2-512x512.pt": (512, OFFICIAL_URL.format(name="DiT-XL-2-512x512.pt")),
}
# The types a checkpoint's config must hold (checked before a model is built from it).
CONFIG_TYPES = {"model": str, "input_size": int, "patch_size": int, "in_channels": int, "hidden_size": int,
                "depth": int, "num_heads": int, "mlp_ratio": (int, float), "class_dropout_prob": (int, float),
                "num_classes": int, "learn_sigma": bool, "norm": str}
# The interventions' kinds (numbers), checked when a config holds them (older checkpoints do not).
OPTIONAL_CONFIG_TYPES = dict.fromkeys(INTERVENTION_KWARGS, (int, float))


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
    fd, tmp = temp_file(dest.parent, name, ".part")
    os.close(fd)
    try:
        _fetch(url, tmp)
        os.replace(tmp, dest)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        reason = first_line(e)
        raise DownloadError(f"download of {url} failed ({reason}); download it manually to {dest}") from e
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
        name = next((n for n, build in DiT_models.items() if same_architecture(build.arch, config)), None)
    if name is None or not same_architecture(DiT_models[name].arch, config):
        raise CheckpointError(
            f"no registry model has depth {depth}, hidden size {hidden_size} and patch size {patch_size}; "
            "add one to DiT_models in models.py"
        )
    config["num_heads"] = DiT_models[name].arch["num_heads"]
    return {"model": name, **config}


def same_architecture(arch, config):
    """Whether a registry entry's architecture (depth, width, patch size) matches config."""
    return all(arch[k] == config[k] for k in ("depth", "hidden_size", "patch_size"))


def is_official_architecture(config) -> bool:
    """Whether an inferred config is one the official DiT code trains: a non-toy registry model on the SD
    VAE's 4 latent channels with a learned sigma and MLP ratio 4 (and so, by definition, LayerNorm)."""
    return (config["model"] not in TOY_MODELS and config["in_channels"] == 4 and config["learn_sigma"]
            and config["mlp_ratio"] == 4.0)


def _is_state_dict(value):
    return isinstance(value, dict) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def _tensors(state_dict, source, part):
    """state_dict if it maps names to tensors, else CheckpointError naming the part of source."""
    if not (isinstance(state_dict, dict) and all(isinstance(k, str) and torch.is_tensor(v)
                                                 for k, v in state_dict.items())):
        raise CheckpointError(f"{source}: its {part} weights are no state dict (names to tensors); pass a "
                              "checkpoint written by train_toy.py")
    return state_dict


def _unpack(checkpoint, use_ema, weights=None, norm=None, source="the checkpoint"):
    """(config with "model" name, state dict) of a checkpoint in any of the three formats.

    weights (this repository's format only): "ema", "raw" or the label of a saved average (averaging.py);
    None: "ema" if use_ema else "raw". norm: the norm of a plain state dict that is no official
    architecture (which does not store it); for the other formats only a check, made by load_model."""
    if not isinstance(checkpoint, dict):
        found = type(checkpoint).__name__
        raise CheckpointError(f"{source} holds a {found}, not a checkpoint's dict; pass a DiT checkpoint")
    if checkpoint.get("format") == FORMAT:
        weights = weights or ("ema" if use_ema else "raw")
        # The EMA falls back to the raw weights when there is none; an average is read out against them.
        uses_ema = weights == "ema" and checkpoint.get("ema") is not None
        needed = ["config", "ema" if uses_ema else "model"]
        lacking = [key for key in needed if not isinstance(checkpoint.get(key), dict)]
        if lacking:
            raise CheckpointError(f"{source} lacks its {' and '.join(lacking)}; pass a complete checkpoint "
                                  "written by train_toy.py")
        config = dict(checkpoint["config"])
        missing = [k for k in ("model", *DIT_KWARGS) if k not in config]
        if missing:
            # Guessing e.g. the norm would silently compute a different function than the one trained.
            missing = ", ".join(missing)
            raise CheckpointError(f"{source}: checkpoint config lacks {missing}; re-save it with the full "
                                  "model.config")
        types = {**CONFIG_TYPES, **{k: v for k, v in OPTIONAL_CONFIG_TYPES.items() if k in config}}
        wrong = [k for k, kinds in types.items()
                 if not isinstance(config[k], kinds) or isinstance(config[k], bool) != (kinds is bool)]
        if wrong:
            wrong = ", ".join(wrong[:3])
            raise CheckpointError(f"{source}: checkpoint config holds {wrong} of the wrong type; pass a "
                                  "checkpoint written by train_toy.py")
        if weights == "raw" or (weights == "ema" and checkpoint.get("ema") is None):
            return config, _tensors(checkpoint["model"], source, "model")
        if weights == "ema":
            return config, _tensors(checkpoint["ema"], source, "ema")
        averages = checkpoint.get("averages") or {}
        if not isinstance(averages, dict):
            raise CheckpointError(f"{source} holds averages that are no dict; pass a checkpoint written by "
                                  "train_toy.py")
        if weights not in averages:
            saved = ", ".join(["ema", "raw", *averages])
            raise CheckpointError(f"this checkpoint holds no {weights!r} weights; choose one of: {saved}")
        average = averages[weights]
        if not isinstance(average, dict):
            raise CheckpointError(f"{source}: its {weights!r} average is no dict; pass a checkpoint written "
                                  "by train_toy.py")
        tensors = _tensors(average.get("tensors"), source, weights)
        raw = _tensors(checkpoint["model"], source, "model")
        return config, read_out({**average, "tensors": tensors}, raw)
    if weights not in (None, "ema", "raw"):
        raise CheckpointError(f"an official checkpoint holds no {weights!r} weights; use ema or raw")
    if "x_embedder.proj.weight" in checkpoint:  # a plain state dict: official published, or a model's own
        if not _is_state_dict(checkpoint):
            raise CheckpointError(f"{source} holds non-tensor values beside its weights; pass a state dict")
        config = infer_official_config(checkpoint)
        if not is_official_architecture(config):
            # A toy model's state_dict() is no official checkpoint: its norm leaves no trace in the keys.
            if norm is None:
                raise CheckpointError(
                    f"{source} is a plain state dict of a {config['model']} model, no official DiT "
                    f"architecture, so its norm is not known; give it (load_model(norm=...), "
                    f"sample.py --norm), one of {', '.join(NORM_KINDS)}"
                )
            config["norm"] = norm
        return config, checkpoint
    if isinstance(checkpoint.get("model"), dict) and "args" in checkpoint:  # official training script
        wants_ema = (weights or ("ema" if use_ema else "raw")) == "ema"
        key = "ema" if wants_ema and isinstance(checkpoint.get("ema"), dict) else "model"
        state_dict = _tensors(checkpoint[key], source, key)
        return infer_official_config(state_dict, checkpoint["args"]), state_dict
    keys = ", ".join(map(str, list(checkpoint)[:6]))
    raise CheckpointError(f"{source} is no checkpoint this code reads (top-level keys: {keys}); expected the "
                          f"{FORMAT} format or an official DiT checkpoint")


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
    function (hub.py; use_ema does not apply there).
    """
    path, config, state_dict, checkpoint = _read(path_or_name, download, use_ema, weights, norm)
    return _build(path, config, state_dict, why=_layernorm_why(checkpoint), norm=norm, model=model,
                  device=device)


def _layernorm_why(checkpoint):
    """Why a checkpoint's norm is layernorm without its saying so ("" for ours, which store it)."""
    if checkpoint is None:
        return " (a diffusers DiT: layernorm by definition)"
    if checkpoint.get("format") != FORMAT:
        return " (an official DiT architecture: layernorm by definition)"
    return ""


def _read(path_or_name, download, use_ema, weights, norm):
    """(path, config, state dict, the checkpoint read or None for a diffusers folder) of any source."""
    folder = hub.diffusers_folder(path_or_name, download)  # a diffusers DiT folder (local or hub id), or None
    if folder is not None:
        if weights not in (None, "ema"):
            raise CheckpointError(f"{folder} is a diffusers folder: it holds one set of weights, not "
                                  f"{weights!r}; drop the weights request")
        return (folder, *hub.read_diffusers_dit(folder), None)
    path = _resolve(path_or_name, download)
    checkpoint = read_checkpoint(path)
    return (path, *_unpack(checkpoint, use_ema, weights, norm=norm, source=path), checkpoint)


def _build(path, config, state_dict, *, why, norm, model, device):
    """load_model's work on a config and state dict read from path (why: _layernorm_why's note)."""
    if norm is not None and norm != config["norm"]:
        raise CheckpointError(
            f"{path} holds a norm={config['norm']} model{why}, not norm={norm}; drop the norm request "
            f"or pass a checkpoint trained with norm={norm}"
        )
    if model is not None and model != config["model"]:
        raise CheckpointError(
            f"{path} holds a {config['model']} model, not {model}; drop the model request or pass "
            f"a {model} checkpoint"
        )
    kwargs = {k: config[k] for k in DIT_KWARGS}
    kwargs.update({k: config.get(k, off) for k, off in INTERVENTION_KWARGS.items()})
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


def diffusion_of(train_args, num_sampling_steps=None):
    """The diffusion a checkpoint was trained with, respaced to num_sampling_steps (None: all its steps).

    train_args: the checkpoint's (load_for_sampling returns them; {} for an official checkpoint).
    train_toy.py records T in train_args["diffusion_steps"] (always the linear schedule); the official
    checkpoints, and ours from before that flag, are DiT's 1000-step linear schedule. CheckpointError when
    num_sampling_steps does not fit T."""
    steps = train_args.get("diffusion_steps", 1000)
    if not isinstance(steps, int) or steps < 1:
        raise CheckpointError(f"the checkpoint's train_args hold diffusion_steps {steps!r}, not a step "
                              "count; pass a checkpoint written by train_toy.py")
    num_sampling_steps = steps if num_sampling_steps is None else num_sampling_steps
    problem = check_sampling_steps(num_sampling_steps, steps)
    if problem:
        raise CheckpointError(f"this checkpoint's diffusion: {problem}")
    return create_diffusion(str(num_sampling_steps), diffusion_steps=steps)


def check_sampling_steps(steps, num_timesteps):
    """None if `steps` evenly respaced steps fit a diffusion of num_timesteps steps, else what to pass."""
    if not 1 <= steps <= num_timesteps:
        return f"{steps} sampling steps do not fit a {num_timesteps}-step diffusion; pass 1 to " \
               f"{num_timesteps}"
    return None


def load_for_sampling(path_or_name, *, download=True, **load_kwargs):
    """load_model plus the checkpoint's train_args (for diffusion_of and the data kind), from one read.

    Returns (model, config, train_args): the dict train_toy.py saved, {} for an official checkpoint.
    load_kwargs: those of load_model."""
    kwargs = {"norm": None, "model": None, "use_ema": True, "weights": None, "device": "cpu", **load_kwargs}
    path, config, state_dict, checkpoint = _read(path_or_name, download, kwargs["use_ema"], kwargs["weights"],
                                                 kwargs["norm"])
    ours = isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT
    model, config = _build(path, config, state_dict, why=_layernorm_why(checkpoint), norm=kwargs["norm"],
                           model=kwargs["model"], device=kwargs["device"])
    train_args = checkpoint.get("train_args") if ours else None
    return model, config, dict(train_args) if isinstance(train_args, dict) else {}


def load_weights_kinds(path, weights, *, device="cpu"):
    """({kind: model} for each weights kind in `weights`, config, train_args) of one of our checkpoints,
    read from disk once (a measurement of every average would otherwise read the file once per kind)."""
    checkpoint = read_checkpoint(path)
    models = {}
    for kind in weights:
        config, state_dict = _unpack(checkpoint, True, kind, source=path)
        models[kind], built = _build(path, config, state_dict, why="", norm=None, model=None, device=device)
    train_args = checkpoint.get("train_args") if isinstance(checkpoint, dict) else None
    return models, built, dict(train_args) if isinstance(train_args, dict) else {}
