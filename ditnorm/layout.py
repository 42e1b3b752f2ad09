"""Where everything lies on disk: the one module that knows the folders of a run and of a record.

A run folder (results/<preset>/<run>/ of experiment.py, results/<index>-<model>-<norm>/ of train_toy.py and
train.py; a shipped weights folder's runs alike): checkpoints/<step, 7 digits>.pt (or .safetensors),
config.json, log.txt. A record (the committed res/<preset>/, or results/<preset>/res/): runs/<run>/ holds
one run's measured files (<name>.csv, pixels.npz, checkpoints.json), the report lies beside runs/.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
LOG = "log.txt"
SHIPPED_SUFFIX = ".safetensors"  # the weights shipped in res/<preset>/weights/ (pretrained.py)
SAMPLES = Path("results", "samples")  # sample.py's outputs unless --out says otherwise


def checkpoint_path(run_dir, step, suffix=".pt"):
    """Where a run folder keeps its checkpoint of `step`."""
    return Path(run_dir, CHECKPOINTS, f"{step:07d}{suffix}")


def run_of(checkpoint):
    """The run folder of a checkpoint file that lies in one (<run>/checkpoints/<step>.pt), else None."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def run_name(checkpoint):
    """<run folder>-<step> of a run's checkpoint file, else the file's stem (for default output names)."""
    run = run_of(checkpoint)
    return f"{run.name}-{Path(checkpoint).stem}" if run else Path(checkpoint).stem


def new_run_dir(results_dir, model, norm):
    """Create results/<index>-<model>-<norm>/ with the next free index; never reuse an existing folder."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(p.name.split("-")[0]) for p in results_dir.iterdir() if p.name.split("-")[0].isdigit()]
        run_dir = results_dir / f"{max(taken, default=-1) + 1:03d}-{model.replace('/', '-')}-{norm}"
        try:
            run_dir.mkdir()  # a concurrent launch may take the same index: then try the next one
            return run_dir
        except FileExistsError:
            continue


def run_checkpoints(run_dir):
    """{step: path} of a run folder's checkpoints/NNNNNNN.pt, or of a shipped weights folder's
    NNNNNNN.safetensors (pretrained.py; a .pt of the same step wins)."""
    folder = Path(run_dir, CHECKPOINTS)
    found = {int(p.stem): p for suffix in (SHIPPED_SUFFIX, ".pt") for p in folder.glob(f"*{suffix}")
             if p.stem.isdigit()}
    return dict(sorted(found.items()))


def checkpoint_at(run_dir, step=None):
    """Path of the run's checkpoint at `step` (default: its last); FileNotFoundError naming what exists."""
    found = run_checkpoints(run_dir)
    if step is None and found:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"{run_dir} has no checkpoint at step {step} (it has {sorted(found)}); "
                                "pass steps that the run saved")
    return found[step]


def latest_checkpoint(path):
    """A checkpoint file as given, or the latest <step>.pt of a run folder (or of its checkpoints/); None
    when there is none."""
    path = Path(path)
    if not path.is_dir():
        return path if path.is_file() else None
    folder = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    steps = sorted(int(p.stem) for p in folder.glob("*.pt") if p.stem.isdigit())
    return folder / f"{steps[-1]:07d}.pt" if steps else None


def max_steps(run_dir):
    """The max_steps a run folder's config.json names, or None."""
    try:
        return json.loads(Path(run_dir, CONFIG).read_text())["train_args"]["max_steps"]
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
