"""res/PROVENANCE.md, written by `experiment.py report --refresh-res`: what made every file in res/.

The table is generated from the preset dict; NOTES keep what the files cannot say themselves (which
machine, which code of which day, what was lost), one entry per folder.
"""

from ditnorm.presets import PRESETS, grids
from ditnorm.recipes import RECIPES
from ditnorm.records import write_atomic

NOTES = {
    "study": [
        "`runs/<data>-<norm>-seed<k>/errors.csv`: the per-seed rows of `python study.py --preset cpu "
        "--seeds 6 --no-dyt-check` (study.py: the runner's predecessor; 2026-11-26, 2-core Intel Xeon, "
        "torch 2.14.1), split by run with every"
        " value copied as text; the 48 runs were trained by `make study` (seeds 0-2) and that command "
        "(seeds 3-5) under `results/study/`. `errors.md`, `errors.csv`, `error_vs_step.png` and the "
        "outcome in `prediction.md` are `report`'s, recomputed from them; the tables equal the ones "
        "study.py wrote.",
        "`legacy/`: the reports study.py wrote (3 seeds with the DyT check; 6 seeds), unchanged. Their "
        "outlier-ratio and DyT-check tables rest on per-seed values that study.py did not keep, so "
        "`report` cannot recompute them; `measure` now keeps them (`outliers.csv`). Their error tables "
        "are `report`'s with `--seeds 0,1,2` and with every seed.",
    ],
    "paper": [
        "`prediction.md` (above \"Outcome\"): written by hand before the first measurement; `report` "
        "rewrites only its outcome.",
        "`runs/<norm>-seed<k>/`, seeds 0 and 1 (first measured by paper.py, the runner's predecessor, "
        "with the same code): seed 0 was trained on the 2-core AMD EPYC by the code just before the "
        "`fast/` restructure (bit-identical training); its checkpoints 15k-45k (and none's 5k-10k) were "
        "lost with the machine's disk before they were measured. Seed 1: the `fast/` step of 2026-12-02 "
        "on the AMD EPYC, every checkpoint measured, `perturb.csv` at 30k, 40k, 45k and 50k. Both were "
        "retrained on 2026-12-04 (2-core AMD EPYC, `experiment.py train --preset paper --seeds 0 --jobs 2`, "
        "then `--seeds 1`, each resumed from 5k); `measure --refresh-res` adopted their folders because the "
        "new checkpoints give back their `weights.csv` exactly (seed 0: layernorm at 5k, 10k and 50k, none "
        "at 50k; seed 1: every step, both norms), and wrote `checkpoints.json`, `direct.csv` (every "
        "checkpoint, 2026-12-04 and 05) and seed 0's sampled statistics of the steps it lacked; their "
        "`run.json` is now the retrained run's. `runs/*-seed2/`: a new training of seed 2 on the 2-core "
        "AMD EPYC (`experiment.py train --preset paper --seeds 2 --jobs 2`, 2026-12-04 to 05, resumed "
        "from 5k), every file written by `measure --preset paper --seeds 2 --jobs 2 --refresh-res` into a "
        "fresh folder. The committed seed 2 it replaces, trained on the Intel Xeon, could not be adopted: "
        "retrained here its 5k checkpoints differ (`legacy/`).",
        "`legacy/`: the record as it stood before seed 2 was replaced. `legacy/runs/*-seed2/`: seed 2 as "
        "trained on the 2-core Intel Xeon (AVX-512) by the `fast/` step of 2026-12-02, as seed 1, and "
        "measured by paper.py; only 50k sampled (statistics at every checkpoint), perturbed at 50k; there "
        "the fast sampler's check refused once (one of the seven weights kinds of no norm's 50k; sampled "
        "with diffusion.p_sample_loop); its checkpoints are gone. `legacy/statistics.md` and "
        "`legacy/results.md`: the 3-seed `statistics.md` and `results.md` of those runs with seeds 0 and "
        "1, unchanged; the numbers of issue 25 and of `docs/results-notes.md` section 6 are theirs. "
        "`tests/test_stats.py` recomputes `legacy/statistics.md` from `legacy/runs/`, `runs/*-seed[01]` "
        "and `pilot/`.",
        "`pilot/`: the one-seed pilot that the predictions followed (`make paper-cpu`, a predecessor of "
        "`make paper`, of 2026-11-26 on the 2-core Intel Xeon: study.py, the runner's predecessor, at the "
        "paper schedule for layernorm and none, seed 0, EMA in "
        "`pilot/`, raw in `pilot/raw/`, reproduce.py's notebooks at 10k and 50k), unchanged. Its runs are"
        " not the runs of `runs/*-seed0`: another machine and the training code of that day, and they "
        "differ from the first checkpoint on (5k, raw weights, median |x|: 1.9e-3 in the pilot, 8.4e-4 in"
        " `runs/layernorm-seed0`), with the same noise set (seed 0, 1000 steps). So LayerNorm's EMA "
        "median at 50k, 3.7e-3 in the pilot against 1.0e-3 in `runs/layernorm-seed0`, is another training"
        " trajectory of the same seed; whether the sampler's code also differed is not established from "
        "the files.",
        "`statistics.md`: `python -c 'import ditnorm.stats as s; s.write_statistics(\"res/paper\")'` "
        "(`tests/test_stats.py` checks that the file equals its output) from `errors.csv`, `weights.csv`, "
        "`perturb.csv` and `runs/*/pixels.npz`: exact rank tests, quantile ratios, the maximum's ratio by "
        "sample count, per-tensor gate norms, perturbation ratios.",
    ],
    "mnist": [
        "`prediction.md`: written by hand after the runs had started and before any of them was measured; "
        "`report` leaves it alone (the outcome is in `results.md`). A timing test of the measurement code "
        "on a 1k checkpoint of a discarded first start (whose split held out only nines) came after it.",
        "`classifier.pt`: the digit classifier behind the Fréchet distance and class accuracy, trained by "
        "`ditnorm.mnist_study.context` (one thread, seed 0) on the 4,500 training images; 0.95 on the "
        "held-out 500.",
        "`yardsticks.csv`: that classifier's accuracy on the 500 held-out digits and their Fréchet distance "
        "to the training digits, which `results.md` names in its header; written by "
        "`ditnorm.studies.mnist.yardsticks` (from `ditnorm.mnist_study.context`) on 2026-12-07, so that "
        "`report` reads them instead of loading MNIST and the classifier again.",
        "`pilot/`: the first pair (MnistDiT-XS/4, layernorm and none, seed 0) at DiT's lr 1e-4, measured "
        "like the rest; its report by `python -c 'from ditnorm import mnist_report; mnist_report.report("
        "\"res/mnist/pilot\", title=\"MNIST pilot at lr 1e-4\")'` of 2026-12-04 (the report is now "
        "`ditnorm.studies.mnist.report`, whose later tables the pilot's lacks). Its samples were no digits, "
        "so the study's recipe became lr 1e-3 (`prediction.md`'s note).",
        "`runs/<model>-<norm>-seed<k>/measures.csv`: `measure` of each finished run (raw weights every "
        "other checkpoint; everything at the last one). The runs of 2026-12-04 were trained by "
        "`ditnorm.trainer.train_run` with the preset's configuration, two runs side by side with one "
        "thread each on the 2-core AMD EPYC, from a small script of the session while `experiment.py` "
        "was being written (the same function and configuration as its `train` phase, which resumes "
        "them). `runs/*/checkpoints.json`: the sha256 of each checkpoint file a folder was measured from, "
        "which `measure` now records and checks; for the runs measured before it did, recorded afterwards "
        "from the same checkpoints (`ditnorm.files.record_checkpoints`).",
        "`weights/`: the EMA weights in float32 of the MnistDiT-XS/4 seed-0 pair (layernorm and none) at "
        "10k steps: this preset's recipe retrained on 2026-12-07 on the 2-core Intel Xeon as the "
        "`interventions` preset's baseline (`python experiment.py train --preset interventions --seeds "
        "0`), not the training measured in `runs/MnistDiT-XS-4-*-seed0/` (AMD EPYC, 2026-12-04); written "
        "by `python export.py weights` (each file's line in `weights/README.md`, its SHA-256 in "
        "`weights/SHA256SUMS`). `mnist_token_embeddings.png` and `token_outliers.md`: "
        "TokenEmbeddingsViz.ipynb on that pair (`papermill TokenEmbeddingsViz.ipynb /tmp/out.ipynb --cwd "
        ". -p checkpoint \"\" -p mnist_dir res/mnist/weights -p mnist_shipped \"\" -p results_dir "
        "res/mnist/weights -p toy_shipped \"\" -p out_dir res/mnist`, 2026-12-07); until then they were of "
        "the MnistDiT-S/4 seed-0 pair, whose checkpoints are gone. `tests/test_notebooks.py` runs the "
        "notebook on `weights/` and checks that it gives these tables.",
    ],
    "reproduce": [
        "`runs/zeros-<norm>-seed<k>/`: `python experiment.py train --preset reproduce --jobs 2`, then "
        "`measure` with `--refresh-res`, of 2026-12-04 (2-core AMD EPYC, torch 2.14.1): the direct "
        "statistic (`direct.csv`), the outlier ratios (`outliers.csv`) and the sampled errors "
        "(`errors.csv`) of the checkpoints in `checkpoints.json`. The `errors.csv` files are byte for byte "
        "those of the `make reproduce ARGS=--refresh-res` of 2026-12-01 on the same kind of machine "
        "(reproduce.py driving study.py, the runner's predecessors), which the retraining reproduced "
        "exactly. `headline.*`, `errors.*`, `direct.csv` and `dit_block.png`: that command's `report "
        "--refresh-res` of 2026-12-04 (the headline values unchanged).",
        "`weights/`: the seed-0 pair (layernorm and none) at 1k and 5k steps, EMA and raw weights in "
        "float32, retrained on 2026-12-07 on the 2-core Intel Xeon (AVX-512) by `python experiment.py "
        "train --preset reproduce --seeds 0 --jobs 1` and written by `python export.py weights` (each "
        "file's line in `weights/README.md`, its SHA-256 in `weights/SHA256SUMS`); the notebooks fall "
        "back on it on a fresh clone. It is not the training measured in `runs/*-seed0/` (AMD EPYC, "
        "2026-12-04, checkpoints gone): retrained on this CPU the toy's trajectory differs (seed 0's raw "
        "median |x| at 5k without a norm, 100 samples: 4.5e-4 here, 2.5e-3 there). `toydit_1k.png`, "
        "`toydit_5k.png`, `toydit_errors.md`, `toydit_token_embeddings_*.png`, `token_outliers.md` and "
        "`results.md` (whose tables include them): `report --refresh-res` of 2026-12-07 on that Intel "
        "Xeon, the notebooks run on this pair (the pretrained DiT-XL/2 part SKIPPED, no network); "
        "`results.md`'s machine is the report's. `tests/test_notebooks.py` runs both notebooks on "
        "`weights/` and checks that they give these tables.",
        "`legacy/seeds/`: the study.py reports of the 2026-12-01 command (EMA; `raw/`), unchanged; their "
        "outlier tables rest on per-seed values that were not kept.",
    ],
}


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
    for name in names:
        lines += [f"## {name}/", "", *[f"- {note}" for note in NOTES.get(name, [])], ""]
    write_atomic(res / "PROVENANCE.md", "\n".join(lines))
