"""Where everything lies on disk: the one module that knows the folders of a run and of a record.

A run folder (results/<preset>/<run>/, what train writes): checkpoints/<step, 7 digits>.pt, config.json,
log.txt. A record (the committed res/<preset>/, or results/<preset>/res/): runs/<run>/ holds one run's
measured files (<name>.csv, pixels.npz, checkpoints.json), the report lies beside runs/.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = "checkpoints"
CONFIG = "config.json"


SHIPPED_SUFFIX = ".safetensors"  # the weights shipped in res/<preset>/weights/ (pretrained.py)


def run_checkpoints(run_dir):
    """{step: path} of a run folder's checkpoints/NNNNNNN.pt, or of a shipped weights folder's
    NNNNNNN.safetensors (pretrained.py; a .pt of the same step wins)."""
    folder = Path(run_dir, CHECKPOINTS)
    found = {int(p.stem): p for suffix in (SHIPPED_SUFFIX, ".pt") for p in folder.glob(f"*{suffix}")
             if p.stem.isdigit()}
    return dict(sorted(found.items()))


def max_steps(run_dir):
    """The max_steps a run folder's config.json names, or None."""
    try:
        return json.loads((Path(run_dir) / CONFIG).read_text())["train_args"]["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_of(preset, results_dir, refresh_res):
    """(the run folders' parent, the record) of a preset: results/<preset>/ and its res/, or the committed
    res/<preset>/ with --refresh-res."""
    runs_dir = Path(results_dir) / preset
    return runs_dir, (ROOT / "res" / preset if refresh_res else runs_dir / "res")


def measured(record, run):
    """The folder of one run's measured files in a record."""
    return Path(record) / "runs" / run


def measured_files(record, name):
    """Every run's <name> (a file name) in a record, in run-name order."""
    return sorted(Path(record).glob(f"runs/*/{name}"))


def last_pair(runs_dir, models, model=None, seed=0, shipped=""):
    """({"layernorm": checkpoint, "none": checkpoint}, model) at the last checkpoint step that the layernorm
    and none runs of `seed` share under runs_dir (folders <model>-<norm>-seed<k>): of the largest of models
    (or `model`) whose pair has finished (a checkpoint at the max_steps of its config.json), else of the
    largest with any common step; else the same of the weights folder `shipped` (pretrained.py), when
    given; FileNotFoundError if there is none."""
    pairs = []
    for name in [model] if model else reversed(models):
        dirs = {norm: Path(runs_dir) / f"{name.replace('/', '-')}-{norm}-seed{seed}"
                for norm in ("layernorm", "none")}
        found = {norm: run_checkpoints(folder) for norm, folder in dirs.items()}
        common = set(found["layernorm"]) & set(found["none"])
        if common:
            pair = {norm: found[norm][max(common)] for norm in found}
            if all(max_steps(folder) in common for folder in dirs.values()):
                return pair, name
            pairs.append((pair, name))
    if pairs:
        return pairs[0]
    if shipped and Path(shipped).is_dir():
        return last_pair(shipped, models, model, seed)
    raise FileNotFoundError(f"no layernorm and none runs of seed {seed} with a common checkpoint under "
                            f"{runs_dir}; train them with python experiment.py train --preset mnist")
