"""DiT in the diffusers format: read a DiTTransformer2DModel folder (or a hub id) as models.DiT's config and
state dict (checkpoint.load_model reads folders through it), and write a models.DiT as one (export.py).

The same weights under other names; diffusers computes its timestep features with downscale_freq_shift=1
and its MLP LayerNorm with the config's eps (docs/diffusers.md). load_model always computes the official
DiT function; `use_official_dit_function` makes a diffusers model compute it too.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ditnorm.files import DIT_KWARGS, FORMAT, CheckpointError, first_line, read_checkpoint
from models import DiT_models, get_2d_sincos_pos_embed

# Written beside config.json by export_diffusers: this repository's config of the exported model (its
# registry name, and a class dropout of 0 that diffusers' fixed null row cannot express); diffusers
# ignores it.
STUDY_CONFIG = "dit_norm_study.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# What the loader maps, checked against config.json; any other value would compute another function.
DIT_ARCHITECTURE = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                        norm_elementwise_affine=False)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", which no checkpoint file name ends like:
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

# Key names: ours -> diffusers'. Each entry is a module whose weight (and bias) are renamed.
TOP_LEVEL = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
             "final_layer.linear": "proj_out_2"}
PER_BLOCK = {"adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
             "mlp.fc2": "ff.net.2"}  # attn.qkv is split into attn1.to_q, to_k, to_v
# diffusers keeps a copy of the one timestep/class embedder in every block, under transformer_blocks.<i>.
EMBEDDER = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
            "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
            "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}


def _snapshot_download(repo_id, allow_patterns):
    """huggingface_hub.snapshot_download (its own function so tests can replace it; they never download)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=allow_patterns)


def download_from_hub(repo_id) -> Path:
    """Local copy of a hub repository's transformer: config.json and safetensors weights only (a pipeline's
    transformer/ subfolder, not its VAE or text encoders)."""
    files = ["config.json", WEIGHTS, "diffusion_pytorch_model-*-of-*.safetensors", f"{WEIGHTS}.index.json"]
    patterns = ["model_index.json", *files, *(f"transformer/{f}" for f in files)]
    try:
        return Path(_snapshot_download(repo_id, patterns))
    except Exception as e:
        raise CheckpointError(
            f"{repo_id} is not a local path and its download from the Hugging Face hub failed "
            f"({first_line(e)}); check the id (log in with `hf auth login` for gated models) or pass a "
            "local folder"
        ) from None


def model_folder(path) -> Path:
    """The folder holding a model's config.json: `path` itself, or a pipeline's transformer/ subfolder."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    raise CheckpointError(f"{path} is a folder without a diffusers config.json (nor transformer/config.json);"
                          " pass a checkpoint file or a folder written by save_pretrained")


def diffusers_folder(path_or_id, download=True) -> Path | None:
    """The local folder of a diffusers model named by a path or a hub id; None when it names neither (a file,
    an official checkpoint name such as DiT-XL-2-256x256.pt, a missing path that is no hub id)."""
    path = Path(path_or_id)
    if path.is_dir():
        return model_folder(path)
    if path.exists() or not HUB_ID.match(str(path_or_id)) or str(path_or_id).endswith(CHECKPOINT_SUFFIXES):
        return None
    if not download:
        raise CheckpointError(f"{path_or_id} is not a local path; allow the download to fetch it from the "
                              "Hugging Face hub, or pass a local folder")
    return model_folder(download_from_hub(str(path_or_id)))


def read_config(folder) -> dict:
    """config.json of a diffusers model folder."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {folder}/config.json ({first_line(e)}); pass a folder written "
                              "by save_pretrained") from None
    if not isinstance(config, dict):
        found = type(config).__name__
        raise CheckpointError(f"{folder}/config.json holds a {found}, not a model config; pass a folder "
                              "written by save_pretrained")
    return config


def read_weights(folder) -> dict:
    """The state dict of a diffusers folder: one safetensors file, sharded ones with their index, or .bin."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / f"{WEIGHTS}.index.json"
    try:
        if (folder / WEIGHTS).is_file():
            return load_file(folder / WEIGHTS)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"cannot read the weights in {folder} ({first_line(e)}); pass a complete "
                              "folder written by save_pretrained") from None
    if (folder / "diffusion_pytorch_model.bin").is_file():
        return read_checkpoint(folder / "diffusion_pytorch_model.bin")
    raise CheckpointError(f"{folder} has no {WEIGHTS} (nor a sharded index or .bin); pass a complete folder")


def _dit_config(folder, cfg, state_dict):
    """DiT kwargs plus a "model" name for a diffusers DiT config.json, or CheckpointError saying why not."""
    name = cfg.get("_class_name")
    if name not in ("DiTTransformer2DModel", "Transformer2DModel") or (
            name == "Transformer2DModel" and cfg.get("norm_type") != "ada_norm_zero"):
        raise CheckpointError(f"{folder} holds a {name}, not a DiTTransformer2DModel; load_model reads DiT "
                              "folders only (probe.py reads PixArt, SD3 and Flux transformers)")
    defaults = dict(DIT_ARCHITECTURE, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                    num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    cfg = {**defaults, **cfg}
    for key, value in DIT_ARCHITECTURE.items():
        if cfg[key] != value:
            raise CheckpointError(f"{folder}/config.json has {key}={cfg[key]!r} where DiT has {value!r}; "
                                  "this loader maps DiT's architecture only")
    in_channels, hidden_size = cfg["in_channels"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out_channels = cfg.get("out_channels") or in_channels
    if (out_channels not in (in_channels, 2 * in_channels) or not isinstance(cfg["sample_size"], int)
            or not isinstance(cfg["num_embeds_ada_norm"], int)):
        raise CheckpointError(f"{folder}/config.json: out_channels {out_channels} with in_channels "
                              f"{in_channels}, sample_size {cfg['sample_size']!r}, num_embeds_ada_norm "
                              f"{cfg['num_embeds_ada_norm']!r} is no DiT; pass a DiT folder")
    fc1 = state_dict.get("transformer_blocks.0.ff.net.0.proj.weight")
    table = state_dict.get("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")
    num_classes = cfg["num_embeds_ada_norm"]
    config = dict(
        input_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=in_channels,
        hidden_size=hidden_size, depth=cfg["num_layers"], num_heads=cfg["num_attention_heads"],
        mlp_ratio=(fc1.shape[0] / hidden_size) if fc1 is not None else 4.0,
        class_dropout_prob=0.1 if table is None or len(table) == num_classes + 1 else 0.0,
        num_classes=num_classes, learn_sigma=out_channels == 2 * in_channels, norm="layernorm",
    )
    ours = Path(folder) / STUDY_CONFIG
    if ours.is_file():  # exported by this repository: its own name and class dropout travel along
        try:
            saved = json.loads(ours.read_text())["config"]
            name, dropout = saved["model"], saved["class_dropout_prob"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read {ours} ({first_line(e)}); delete it to load the folder as a "
                                  "plain diffusers DiT") from None
        differing = [k for k in DIT_KWARGS if k != "class_dropout_prob" and saved.get(k) != config[k]]
        if differing:
            raise CheckpointError(f"{ours} disagrees with config.json on {', '.join(differing)}; delete "
                                  f"{STUDY_CONFIG} if config.json is the one to trust")
        return {"model": name, **config, "class_dropout_prob": dropout}
    return {"model": registry_name(config), **config}


def registry_name(config) -> str:
    """The DiT_models name of this architecture (depth, width, patch, heads), else "DiTTransformer2DModel"."""
    for name, build in DiT_models.items():
        if all(build.arch[k] == config[k] for k in ("depth", "hidden_size", "patch_size", "num_heads")):
            return name
    return "DiTTransformer2DModel"


def _renamed(state_dict, ours, theirs, out):
    """Move theirs.weight/.bias of state_dict to ours.weight/.bias of out (missing keys are left missing)."""
    for suffix in ("weight", "bias"):
        if f"{theirs}.{suffix}" in state_dict:
            out[f"{ours}.{suffix}"] = state_dict.pop(f"{theirs}.{suffix}")


def _modules(depth):
    """(our name, diffusers' name) of every module renamed one to one (TOP_LEVEL, and PER_BLOCK per block)."""
    yield from TOP_LEVEL.items()
    for i in range(depth):
        for ours, theirs in PER_BLOCK.items():
            yield f"blocks.{i}.{ours}", f"transformer_blocks.{i}.{theirs}"


def from_diffusers_state_dict(state_dict, config, source="the folder") -> dict:
    """A diffusers DiT state dict in models.DiT's names; the per-block embedder copies must be equal."""
    sd, out, depth = dict(state_dict), {}, config["depth"]
    for ours, theirs in _modules(depth):
        _renamed(sd, ours, theirs, out)
    for ours, theirs in EMBEDDER.items():
        for suffix in ("weight", "bias"):
            copies = [sd.pop(f"transformer_blocks.{i}.{theirs}.{suffix}", None) for i in range(depth)]
            if copies[0] is None:
                continue
            for i, copy in enumerate(copies[1:], start=1):
                if copy is None or copy.shape != copies[0].shape or not torch.equal(copy, copies[0]):
                    raise CheckpointError(
                        f"{source}: block {i}'s copy of {theirs}.{suffix} differs from block 0's; models.DiT "
                        "has one timestep/class embedder, so only folders whose copies agree can be loaded")
            out[f"{ours}.{suffix}"] = copies[0]
    table = out.get("y_embedder.embedding_table.weight")
    if config["class_dropout_prob"] == 0 and table is not None and len(table) == config["num_classes"] + 1:
        out["y_embedder.embedding_table.weight"] = table[:-1]  # the null row that diffusers always has
    for i in range(depth):
        prefix = f"transformer_blocks.{i}"
        for suffix in ("weight", "bias"):
            qkv = [sd.pop(f"{prefix}.attn1.to_{p}.{suffix}", None) for p in "qkv"]
            if all(t is not None for t in qkv):
                out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(qkv)
    grid = config["input_size"] // config["patch_size"]
    out["pos_embed"] = get_2d_sincos_pos_embed(config["hidden_size"], grid).float().unsqueeze(0)  # (1, T, D)
    return {**out, **sd}  # whatever is left over is reported as unexpected by load_model


def read_diffusers_dit(folder) -> tuple[dict, dict]:
    """(config with "model" name, models.DiT state dict) of a diffusers DiT folder."""
    cfg = read_config(folder)
    state_dict = read_weights(folder)
    config = _dit_config(folder, cfg, state_dict)
    return config, from_diffusers_state_dict(state_dict, config, source=folder)


def diffusers_config(config) -> dict:
    """DiTTransformer2DModel kwargs for a DiT config (norm_eps 1e-6 as in DiT)."""
    return dict(num_attention_heads=config["num_heads"],
                attention_head_dim=config["hidden_size"] // config["num_heads"],
                in_channels=config["in_channels"],
                out_channels=config["in_channels"] * (2 if config["learn_sigma"] else 1),
                num_layers=config["depth"], sample_size=config["input_size"], patch_size=config["patch_size"],
                num_embeds_ada_norm=config["num_classes"], norm_eps=1e-6, **DIT_ARCHITECTURE)


def to_diffusers_state_dict(state_dict, config) -> dict:
    """models.DiT state dict -> DiTTransformer2DModel's (every tensor its own contiguous copy)."""
    sd, out = {k: v.detach().cpu() for k, v in state_dict.items()}, {}
    for ours, theirs in _modules(config["depth"]):
        _renamed(sd, theirs, ours, out)
    table = sd["y_embedder.embedding_table.weight"]
    if config["class_dropout_prob"] == 0:  # diffusers always has a null row; it is never looked up here
        sd["y_embedder.embedding_table.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
    embedder = {}
    for ours, theirs in EMBEDDER.items():
        _renamed(sd, theirs, ours, embedder)
    for i in range(config["depth"]):
        prefix = f"transformer_blocks.{i}"
        out.update({f"{prefix}.{k}": v for k, v in embedder.items()})
        for suffix in ("weight", "bias"):
            for p, t in zip("qkv", sd.pop(f"blocks.{i}.attn.qkv.{suffix}").chunk(3), strict=True):
                out[f"{prefix}.attn1.to_{p}.{suffix}"] = t
    sd.pop("pos_embed")
    assert not sd, f"unmapped keys: {list(sd)[:3]}"
    return {k: v.clone().contiguous() for k, v in out.items()}


def export_diffusers(model, out_dir, *, name=None, source="the model", overwrite=False) -> Path:
    """Write a models.DiT as a DiTTransformer2DModel folder (name: its registry name, found from its
    architecture when None; source: what error messages call it, e.g. the checkpoint it was loaded from).

    The folder is written beside out_dir under a temporary name and renamed when complete, so an error never
    leaves a half-written folder. Only LayerNorm DiTs with mlp_ratio 4 exist in diffusers.
    """
    config = {"model": name or registry_name(model.config), **model.config}
    if config["norm"] != "layernorm":
        raise CheckpointError(f"{source} is a norm={config['norm']} model; diffusers' DiTTransformer2DModel "
                              "is a LayerNorm DiT, so export only norm=layernorm checkpoints")
    if config["mlp_ratio"] != 4:
        raise CheckpointError(f"{source} has mlp_ratio {config['mlp_ratio']}; DiTTransformer2DModel's MLP is "
                              "4x wide, so export only mlp_ratio 4 models")
    if config.get("cap"):
        raise CheckpointError(f"{source} caps each block's output (cap {config['cap']}); diffusers' DiT has "
                              "no such clamp, so export only models trained without --cap")
    state_dict = model.state_dict()
    grid = config["input_size"] // config["patch_size"]
    table = get_2d_sincos_pos_embed(config["hidden_size"], grid).float()  # (T, D): what diffusers computes
    if not torch.allclose(state_dict["pos_embed"][0].cpu().float(), table, atol=1e-6):
        raise CheckpointError(f"{source}'s pos_embed is not DiT's fixed sin-cos table, which diffusers "
                              "recomputes; export only models with the fixed table")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} exists; pass a new folder or overwrite it (--overwrite)")
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):  # no random init: the checkpoint's tensors are adopted below
        net = DiTTransformer2DModel(**diffusers_config(config))
    net.load_state_dict(to_diffusers_state_dict(state_dict, config), strict=True, assign=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        net.save_pretrained(tmp, safe_serialization=True)
        note = ("this repository's config of the model; load_model reads it, diffusers ignores it. diffusers "
                "computes timestep frequencies with downscale_freq_shift=1 where the model was trained with "
                "0: see docs/diffusers.md")
        (tmp / STUDY_CONFIG).write_text(json.dumps({"format": FORMAT, "config": config, "note": note},
                                                   indent=2) + "\n")
        old = None
        if out_dir.exists():  # overwrite: the old folder moves aside first, and goes once the new one is in
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def use_official_dit_function(model):
    """Make a diffusers DiTTransformer2DModel compute the official DiT function, in place: timestep
    frequencies exp(-ln(1e4) k / half) (downscale_freq_shift 0), eps 1e-6 in every block's MLP LayerNorm."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    return model


@torch.no_grad()
def compare_with_diffusers(folder, ours, *, batch_size=4, seed=0) -> dict:
    """Largest |difference| between diffusers' forward of the DiT folder and ours (the folder as
    checkpoint.load_model builds it), relative to the largest |output| of ours: as saved, with the timestep
    shift set to 0, and fully official."""
    from diffusers import DiTTransformer2DModel

    config = ours.config
    theirs = DiTTransformer2DModel.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(seed)
    size = config["input_size"]
    x = torch.randn(batch_size, config["in_channels"], size, size, generator=g)
    t = torch.linspace(0, 999, batch_size).round().long()
    y = torch.randint(0, config["num_classes"], (batch_size,), generator=g)
    reference = ours(x, t, y)  # (N, C_out, H, W)

    def gap():
        return ((theirs(x, t, y).sample - reference).abs().max() / reference.abs().max()).item()

    result = {"norm_eps": theirs.config.norm_eps, "as_saved": gap()}
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    result["shift_0"] = gap()
    use_official_dit_function(theirs)
    result["official"] = gap()
    return result
