"""Checkpoint files on disk: read_checkpoint (torch.load(weights_only=True), or shipped .safetensors
weights checked against their SHA256SUMS), where any failure of the parse of a damaged or foreign file is
one CheckpointError line naming it; save_checkpoint (atomic, refusing non-finite weights); and the digests
that keep a folder of statistics to the one training it measured (stats_checkpoints).
"""

import argparse
import hashlib
import json
import pickle
import re
import struct
import warnings
from pathlib import Path

import torch

from ditnorm.layout import SHIPPED_SUFFIX
from ditnorm.records import first_line, write_atomic

FORMAT = "dit-norm-study/1"
DIT_KWARGS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
              "class_dropout_prob", "num_classes", "learn_sigma", "norm")
# The study's interventions (models.DiT's dropout and cap): off when a checkpoint's config lacks them, as
# every checkpoint written before they existed does.
INTERVENTION_KWARGS = {"dropout": 0.0, "cap": 0.0}


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the request; the message says what to do."""


class DownloadError(CheckpointError):
    """An official checkpoint could not be downloaded (a failure, not a bad request)."""


def nonfinite_parts(obj: dict) -> list[str]:
    """Which weights of a checkpoint hold a NaN or an infinity: "model", "ema", "averages/<label>"."""
    groups = {key: obj.get(key) for key in ("model", "ema")}
    averages = obj.get("averages")
    if isinstance(averages, dict):
        groups.update({f"averages/{label}": (average or {}).get("tensors")
                       for label, average in averages.items() if isinstance(average, dict)})
    bad = []
    for name, tensors in groups.items():
        floats = [t for t in (tensors or {}).values() if torch.is_tensor(t) and t.is_floating_point()]
        if floats and not torch.stack([torch.isfinite(t).all() for t in floats]).all():
            bad.append(name)
    return bad


def save_checkpoint(obj: dict, path) -> None:
    """Write obj atomically (records.write_atomic); CheckpointError, nothing written, for weights that are
    not finite."""
    bad = nonfinite_parts(obj)
    if bad:
        raise CheckpointError(f"not saving {path}: its {', '.join(bad)} weights are not finite")
    write_atomic(path, lambda f: torch.save(obj, f))


def _container_problem(path):
    """Why path cannot be a torch.save file (a folder, empty, neither a zip nor a pickle), or None."""
    if Path(path).is_dir():
        return "is a folder"
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e}); pass a checkpoint file you can "
                              "read") from None
    # torch.save writes a zip archive ("PK"); its legacy format is a pickle of protocol 2 or later (0x80).
    return "is empty" if not head else None if head == b"PK" or head[0] == 0x80 else \
        "is neither a zip archive nor a pickle"


def read_checkpoint(path) -> dict:
    """torch.load on CPU with weights_only=True; only argparse.Namespace (official args) is allow-listed.
    A .safetensors file: read_shipped's checkpoint.

    Whatever cannot be read is a CheckpointError naming the file: torch.load's unpickler and zip reader raise
    any exception type on a damaged or foreign file (KeyError for a text file), so the parse itself is caught
    whole; nothing else is inside that try."""
    if Path(path).suffix == SHIPPED_SUFFIX:
        return read_shipped(path)
    problem = _container_problem(path)
    if problem:
        raise CheckpointError(f"cannot read {path}: it {problem}, so no PyTorch checkpoint; pass a "
                              "checkpoint file written by torch.save")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # Said of any pickle of protocol > 2, before the unpickler refuses or reads it: not for the user.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:  # a file too large for this machine is no damaged one
        raise
    except Exception as e:  # foreign data: any failure of its parse is the file's, not a bug here
        # PyTorch's message is a paragraph; the one fact worth a line is which global it refused.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and refused:
            raise CheckpointError(
                f"{path} holds a {refused.group(1)} object, not plain data; re-save it with tensors, "
                "numbers, strings and dicts only"
            ) from None
        # The gist of torch.load's failure (its messages run to paragraphs), without c10's source location.
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        line = unpickler.group(1) if unpickler else str(e).strip().split("\n")[0]
        line = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", line).split(". ")[0].strip()
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {line}); "
                              "pass a complete checkpoint written by torch.save") from None


# Shipped weights (pretrained.py writes them): <weights>/<run>/checkpoints/<step>.safetensors, the tensors of
# each weights kind under "<kind>.<name>" ("ema", and "model" for the raw ones), the rest of a checkpoint in
# the metadata as JSON; <weights>/SHA256SUMS, as sha256sum writes it, holds each file's digest.
SUMS = "SHA256SUMS"
SHIPPED_KINDS = {"ema": "ema", "raw": "model"}  # weights kind -> its tensors' prefix (a checkpoint's key)
SHIPPED_METADATA = ("config", "train_args", "step", "provenance")  # JSON text each; "format" plain


def shipped_sums(path):
    """(SHA256SUMS file, {relative path: hex digest}) of the weights folder holding path (the nearest of its
    parents, up to <weights>/<run>/checkpoints/), or (None, {}) when none holds one."""
    for folder in list(Path(path).absolute().parents)[:3]:
        sums = folder / SUMS
        if sums.is_file():
            try:
                lines = sums.read_text().splitlines()
                pairs = [line.split(maxsplit=1) for line in lines if line.strip()]
                return sums, {name.lstrip("*"): digest for digest, name in pairs}
            except (OSError, UnicodeDecodeError, ValueError):
                raise CheckpointError(f"{sums} is damaged; restore it (git checkout) or write the weights "
                                      "again with export.py weights") from None
    return None, {}


def safetensors_header(data: bytes) -> dict:
    """The JSON header of a safetensors file's bytes: {tensor: {dtype, shape, ...}, "__metadata__": {...}}."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])


def read_shipped(path) -> dict:
    """A shipped .safetensors file as a checkpoint dict of FORMAT (its tensors in float32); CheckpointError
    naming the file when it is damaged, foreign, or not the file its SHA256SUMS lists."""
    from safetensors.torch import load as load_safetensors

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        reason = e.strerror or e
        raise CheckpointError(f"cannot read {path} ({reason}); pass a weights file you can read") from None
    sums, digests = shipped_sums(path)
    if sums is not None:
        name = Path(path).absolute().relative_to(sums.parent.absolute()).as_posix()
        if name not in digests:
            raise CheckpointError(f"{path} is not listed in {sums}; write it with export.py weights")
        if hashlib.sha256(data).hexdigest() != digests[name]:
            raise CheckpointError(f"{path} does not match its SHA-256 in {sums} (damaged or replaced); "
                                  "restore it (git checkout) or write it again with export.py weights")
    try:
        header = safetensors_header(data)
        tensors = load_safetensors(data)
    except Exception as e:  # a damaged file: any failure of its parse is the file's
        raise CheckpointError(f"cannot read {path} as safetensors weights ({first_line(e)}); restore it "
                              "(git checkout) or write it again with export.py weights") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not (isinstance(metadata, dict) and metadata.get("format") == FORMAT
            and set(SHIPPED_METADATA) <= set(metadata)):
        raise CheckpointError(f"{path} holds no {FORMAT} weights (no config in its metadata); pass weights "
                              "written by export.py weights")
    try:
        checkpoint = {"format": FORMAT, **{key: json.loads(metadata[key]) for key in SHIPPED_METADATA}}
    except ValueError:
        raise CheckpointError(f"{path} holds damaged metadata; write it again with export.py "
                              "weights") from None
    for kind in SHIPPED_KINDS.values():
        part = {name[len(kind) + 1:]: t.float() if t.is_floating_point() else t
                for name, t in tensors.items() if name.startswith(kind + ".")}
        if part:
            checkpoint[kind] = part
    return checkpoint


# The checkpoints a folder of statistics was measured from: <stats>/checkpoints.json, {step: sha256 of the
# checkpoint file}. Measuring is incremental (a measured checkpoint is skipped), so without it a retrained
# run measured into a folder of an earlier training would mix two trainings' statistics in one table.
FINGERPRINTS = "checkpoints.json"


def file_digest(path) -> str:
    """'sha256:<hex>' of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def recorded_checkpoints(stats_dir) -> dict:
    """{step: digest} of the checkpoints stats_dir/checkpoints.json says were measured into stats_dir ({}
    without that file); a CheckpointError where it is damaged."""
    path = Path(stats_dir) / FINGERPRINTS
    if not path.is_file():
        return {}
    try:
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError):
        raise CheckpointError(f"{path} is damaged; move {stats_dir} away and measure again") from None


def stats_checkpoints(stats_dir, checkpoints: dict, adopt=None) -> dict:
    """The digests stats_dir/checkpoints.json should hold once these checkpoints ({step: path}) are measured
    into stats_dir: its recorded ones and these. Writes nothing (record them with record_checkpoints).

    A CheckpointError when stats_dir holds statistics but no checkpoints.json (measured elsewhere, or before
    digests were kept), unless `adopt(stats_dir, checkpoints)` proves them of these checkpoints (it raises a
    CheckpointError where it cannot); and for a recorded step whose checkpoint now differs (a retrained
    run). A step recorded but no longer on disk is kept: it says which training was measured."""
    stats_dir = Path(stats_dir)
    recorded = recorded_checkpoints(stats_dir)
    if not (stats_dir / FINGERPRINTS).is_file():
        if stats_dir.is_dir() and any(p.is_file() for p in stats_dir.iterdir()):
            if adopt is None:
                raise CheckpointError(f"{stats_dir} holds statistics of checkpoints it did not record "
                                      f"(measured elsewhere or before {FINGERPRINTS} was kept); move it away "
                                      "to measure these checkpoints into a fresh folder")
            adopt(stats_dir, checkpoints)
    current = {step: file_digest(p) for step, p in checkpoints.items()}
    changed = sorted(s for s in recorded.keys() & current.keys() if recorded[s] != current[s])
    if changed:
        raise CheckpointError(f"{stats_dir} was measured from another training of this run (its checkpoint "
                              f"at step {changed[0]} differs from the one now on disk); move {stats_dir} "
                              "away to measure this training")
    return dict(sorted({**recorded, **current}.items()))


def record_checkpoints(stats_dir, digests: dict) -> None:
    """Write stats_checkpoints' digests to stats_dir/checkpoints.json (atomically; unchanged, not at all)."""
    path = Path(stats_dir) / FINGERPRINTS
    text = json.dumps({str(k): v for k, v in sorted(digests.items())}, indent=1) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, text)
