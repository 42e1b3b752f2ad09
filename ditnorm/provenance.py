"""res/PROVENANCE.md, written by `experiment.py report --refresh-res`: what made every file in res/. The table
comes from the preset dict; the notes of docs/provenance.md ("## <preset>/" sections) say what the files
cannot."""

import re

from ditnorm.layout import ROOT
from ditnorm.presets import PRESETS, grids
from ditnorm.recipes import RECIPES
from ditnorm.records import write_atomic


def notes(path=ROOT / "docs" / "provenance.md"):
    """{preset: [its notes' lines, each "- ..."]} of docs/provenance.md."""
    sections = re.split(r"^## (\S+)/$", path.read_text(), flags=re.M)[1:]
    return {name: [line for line in body.splitlines() if line.startswith("- ")]
            for name, body in zip(sections[::2], sections[1::2], strict=True)}


def preset_line(name):
    preset = PRESETS[name]
    recipe = RECIPES[preset["recipe"]]
    made = f"`python experiment.py train\\|measure\\|report --preset {name} --refresh-res`"
    seeds = {}  # the grids' seeds merged per (model, norm, data), in the order listed
    for grid in grids(preset):
        key = (", ".join(grid["model"]), ", ".join(grid["norm"]), ", ".join(grid["data"]))
        seeds.setdefault(key, []).extend(s for s in grid["seed"] if s not in seeds.get(key, []))
    runs = " and ".join(f"{model}; norms {norm}; data {data}; seeds {','.join(map(str, seed))}"
                        for (model, norm, data), seed in seeds.items())
    how = (f"recipe `{preset['recipe']}`: batch {recipe['global_batch_size']}, lr {recipe['lr']:g}, EMA "
           f"{recipe['ema_decay']}, {recipe['max_steps']} steps; measured by `{preset['measure'].__name__}`, "
           f"reported by `{preset['report'].__module__}.{preset['report'].__name__}`")
    return f"| `{name}/` | {made} (train writes `results/{name}/`) | {runs}; {how} |"


def write(res):
    """Rewrite res/PROVENANCE.md for every preset that has a folder in res/."""
    names = [name for name in PRESETS if (res / name).is_dir()]
    lines = [
        "# Provenance of every file in res/",
        "",
        "Written by `python experiment.py report --preset NAME --refresh-res` from the presets of "
        "ditnorm/presets.py. Every file here was written by one of the repository's commands; none was "
        "edited by hand. Per-run statistics are in `<preset>/runs/<run>/`, the report in `<preset>/`; the "
        "run folders behind them (checkpoints, logs) are under `results/`, which git does not keep; the one "
        "exception, `<preset>/weights/`, holds the few small weights behind the notebooks' figures "
        "(`python export.py weights`; their provenance and SHA-256 in its `README.md`).",
        "",
        "| folder | made by | runs |",
        "|---|---|---|",
        *map(preset_line, names),
        "",
    ]
    said = notes()
    for name in names:
        lines += [f"## {name}/", "", *said.get(name, []), ""]
    write_atomic(res / "PROVENANCE.md", "\n".join(lines))
