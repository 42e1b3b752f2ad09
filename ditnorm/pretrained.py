"""Writing the small trained weights that ship with the repository (res/<preset>/weights/, export.py
weights), so that the notebooks show their figures on a fresh clone. A weights folder is laid out as run
folders (layout.py), every file a checkpoint files.read_checkpoint reads (its tensors, and its config,
train_args, step and provenance in the metadata), with a SHA256SUMS every read checks and a README.md.
"""

import hashlib
import json
from pathlib import Path

import torch

from ditnorm import layout
from ditnorm.checkpoint import load_model
from ditnorm.files import (
    FORMAT,
    SHIPPED_KINDS,
    SHIPPED_SUFFIX,
    SUMS,
    CheckpointError,
    file_digest,
    read_checkpoint,
    safetensors_header,
    shipped_sums,
)
from ditnorm.records import write_atomic

DTYPES = {"float32": torch.float32, "float16": torch.float16}
KINDS = SHIPPED_KINDS  # weights kind -> its tensors' prefix (a checkpoint's key)


def training_command(run_dir) -> str | None:
    """The experiment.py command that trains a run folder results/<preset>/<run>, or None for another
    folder (a run of train_toy.py, or one a preset does not name)."""
    from ditnorm.presets import PRESETS, runs

    run_dir = Path(run_dir)
    preset = run_dir.parent.name
    if preset not in PRESETS:
        return None
    cfg = dict(runs(preset)).get(run_dir.name)
    return cfg and f"python experiment.py train --preset {preset} --seeds {cfg['seed']}"


def export_weights(checkpoint_path, weights_dir, *, run, weights=("ema",), dtype="float32", trained_by,
                   command) -> Path:
    """Write the `weights` kinds ("ema", "raw") of one of our checkpoints into weights_dir as run `run`,
    in `dtype`, then its SHA256SUMS and README.md; returns the file written.

    trained_by: the command that trained the run; command: the one that exported it (both go into the
    provenance line). CheckpointError, nothing written, for a checkpoint that is not ours, lacks a kind, or
    holds a value that is not finite in `dtype`."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    unknown = [kind for kind in weights if kind not in KINDS]
    if unknown or not weights:
        raise CheckpointError(f"weights {', '.join(unknown) or '(none)'}: choose from {', '.join(KINDS)}")
    checkpoint = read_checkpoint(checkpoint_path)
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT):
        raise CheckpointError(f"{checkpoint_path} is no checkpoint of this repository ({FORMAT}); pass one "
                              "written by train_toy.py or experiment.py train")
    tensors, config = {}, None
    for kind in weights:
        if not isinstance(checkpoint.get(KINDS[kind]), dict):  # load_model would give the raw ones for ema
            raise CheckpointError(f"{checkpoint_path} holds no {kind} weights; drop them from --weights")
        model, config = load_model(checkpoint_path, weights=kind)  # checks config and keys
        for name, tensor in model.state_dict().items():
            tensors[f"{KINDS[kind]}.{name}"] = tensor.to(DTYPES[dtype]).contiguous()
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{checkpoint_path}: {bad[0]} is not finite in {dtype}; export float32")
    step = checkpoint.get("step")
    source = Path(checkpoint_path).resolve()
    source = source.relative_to(layout.ROOT) if source.is_relative_to(layout.ROOT) else Path(checkpoint_path)
    digest = file_digest(checkpoint_path)[:23]  # "sha256:" and 16 hex digits
    provenance = (f"{'+'.join(weights)} weights in {dtype} of {source} (step {step}, {digest}...), "
                  f"trained by `{trained_by}`; written by `{command}`")
    config = dict(checkpoint["config"])  # as saved: load_model's config adds nothing it lacks
    metadata = {"format": FORMAT, "config": json.dumps(config), "step": json.dumps(step),
                "train_args": json.dumps(checkpoint.get("train_args") or {}),
                "provenance": json.dumps(provenance)}
    from safetensors.torch import save

    path = layout.checkpoint_path(Path(weights_dir, run), step, SHIPPED_SUFFIX)
    data = save(tensors, metadata=metadata)
    write_atomic(path, data)
    write_sums(weights_dir, {path.relative_to(weights_dir).as_posix(): hashlib.sha256(data).hexdigest()})
    write_atomic(Path(weights_dir) / "README.md", readme_text(weights_dir))
    return path


def write_sums(weights_dir, digests):
    """Add {relative path: hex digest} to weights_dir/SHA256SUMS (sha256sum's format), sorted."""
    sums = Path(weights_dir) / SUMS
    _, known = shipped_sums(sums)
    known = {**known, **digests}
    write_atomic(sums, "".join(f"{digest}  {name}\n" for name, digest in sorted(known.items())))


def readme_text(weights_dir) -> str:
    """weights_dir/README.md's text: a row per file of SHA256SUMS (its bytes, kinds, dtype, digest and
    provenance)."""
    weights_dir = Path(weights_dir)
    _, digests = shipped_sums(weights_dir / SUMS)
    rows = []
    for name, digest in sorted(digests.items()):
        meta = safetensors_header((weights_dir / name).read_bytes())
        tensors = {k: v for k, v in meta.items() if k != "__metadata__"}
        kinds = [kind for kind, prefix in KINDS.items() if any(k.startswith(prefix + ".") for k in tensors)]
        dtypes = sorted({v["dtype"] for v in tensors.values()})
        provenance = json.loads(meta["__metadata__"]["provenance"])
        size = (weights_dir / name).stat().st_size
        rows.append(f"| `{name}` | {size:,} | {'+'.join(kinds)} | {','.join(dtypes)} | `{digest}` | "
                    f"{provenance} |")
    return (
        "# Shipped weights\n\n"
        "Written by `python export.py weights` (ditnorm/pretrained.py); do not edit. Each file is a "
        "checkpoint's weights as safetensors, read by every reader of a checkpoint or run folder "
        "(`load_model`, `sample.py --ckpt`, the notebooks); every read checks its SHA-256 against "
        "`SHA256SUMS` (`sha256sum -c SHA256SUMS` here checks them too).\n\n"
        "| file | bytes | weights | dtype | SHA-256 | provenance |\n|---|---:|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )
