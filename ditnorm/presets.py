"""Every experiment of the repository, one preset each, in one dict (experiment.py runs them).

A preset names the grid of runs (model, norm, data, seeds), the training recipe, how a run folder is
named, the checkpoints, what is measured of each (a function of measures.py, with its arguments) and the
report (a function of its study's file in studies/ that reads whatever per-run files exist). A recipe is
defined once, in recipes.py.
"""

import itertools

from ditnorm import measures, mnist_study
from ditnorm.recipes import RECIPES
from ditnorm.studies import mnist, paper, toy
from models import NORM_KINDS

# The interventions (res/interventions/prediction.md says why these levels), a grid axis: each names the
# training keys it changes from its preset's recipe. AdamW's decay shrinks the weights by exp(-lr decay
# steps): exp(-1) at 0.1, exp(-10) at 1.0; cap4 holds every value to 4x its token's RMS (models.cap_to_rms).
INTERVENTIONS = {"baseline": {}, "wd0.1": {"weight_decay": 0.1}, "wd1": {"weight_decay": 1.0},
                 "dropout0.3": {"dropout": 0.3}, "cap4": {"cap": 4.0}}

# The direct statistic (measures.direct_rows) on 10^5 fresh inputs from the noise set noise_seed + the run's
# seed, at every checkpoint (last=None) or the recipe's last `last` (its CPU cost: docs/results-notes.md).
DIRECT = dict(timesteps=(0, 1, 10), num_inputs=100_000, noise_seed=1000, last=None)

SAMPLE_ERRORS = dict(weights=("ema",), num_samples=1000, sampling_steps=100, sample_seed=0,
                     outlier_timestep=100, direct=DIRECT)

PRESETS = {
    # The 4-norm CPU study on two data sets (zero images, and constant images c ~ U[-1, 1]): does LayerNorm's
    # loss of scale cost sample quality? EMA weights, 1000 samples x 100 steps per checkpoint.
    "study": dict(
        recipe="cpu-short",
        grid=dict(
            model=["ToyDiT/1"], norm=list(NORM_KINDS), data=["zeros", "constant"], seed=[0, 1, 2, 3, 4, 5]
        ),
        run_name="{data}-{norm}-seed{seed}",
        measure=measures.sample_errors,
        # the direct statistic at the last 3 checkpoints only, which the report's main table uses: 48 runs
        # x 6 checkpoints x 10^5 inputs would cost the CPU more than the training does
        measure_args=dict(SAMPLE_ERRORS, direct=dict(DIRECT, last=3)),
        report=toy.study_report,
    ),
    # The claim at the paper's own schedule: LayerNorm and no norm, raw weights, the EMA and five other
    # averages, with the predictions of res/paper/prediction.md.
    "paper": dict(
        recipe="paper",
        grid=dict(model=["ToyDiT/1"], norm=["layernorm", "none"], data=["zeros"], seed=[0, 1, 2]),
        run_name="{norm}-seed{seed}",
        measure=measures.paper_statistics,
        # its committed runs/ were measured before checkpoints.json was kept: a retrained run joins them
        # only if its checkpoints give back their weights.csv exactly (the same training, measured on)
        adopt=measures.same_training_by_weights,
        measure_args=dict(
            num_samples=1000,
            sampling_steps=1000,
            rms_batch=256,
            perturb_steps={1: (30_000, 40_000, 45_000, 50_000), 2: (50_000,)},
            # the direct statistic of the weights kinds the report tables (of the 7 sampled)
            direct=dict(DIRECT, weights=paper.DIRECT_WEIGHTS),
        ),
        report=paper.report,
    ),
    # make reproduce: 3 seeds of both toy models at the CPU recipe, EMA and raw weights, the headline set
    # beside the committed one (res/reproduce/headline.json), and both notebooks on seed 0.
    "reproduce": dict(
        recipe="cpu",
        grid=dict(model=["ToyDiT/1"], norm=["layernorm", "none"], data=["zeros"], seed=[0, 1, 2]),
        run_name="{data}-{norm}-seed{seed}",
        measure=measures.sample_errors,
        measure_args=dict(SAMPLE_ERRORS, weights=("ema", "raw"), num_samples=500, sampling_steps=1000),
        report=toy.reproduce_report,
        notebook_steps=None,
    ),
    # The tests: make reproduce in seconds (no pretrained model, no download).
    "tiny": dict(
        recipe="tiny",
        grid=dict(model=["ToyDiT-XS/1"], norm=["layernorm", "none"], data=["zeros"], seed=[0, 1]),
        run_name="{data}-{norm}-seed{seed}",
        measure=measures.sample_errors,
        measure_args=dict(SAMPLE_ERRORS, weights=("ema", "raw"), num_samples=20, sampling_steps=10,
                          direct=dict(DIRECT, num_inputs=2048)),
        report=toy.reproduce_report,
        notebook_steps=None,
        pretrained="",
    ),
    # The question on real images (res/mnist/prediction.md): two sizes, layernorm and none at 3 seeds,
    # rmsnorm and dyt at one; held-out NLL, the denoiser's precision, samples, the residual stream.
    "mnist": dict(
        recipe="mnist",
        # in training order, which --jobs 2 follows two runs at a time: the small size first, then the
        # larger one a layernorm/none pair per seed, so that a stopped study leaves matched pairs
        grid=[dict(model=["MnistDiT-XS/4"], norm=["layernorm", "none"], data=["mnist"], seed=[0, 1, 2]),
              dict(model=["MnistDiT-XS/4"], norm=["rmsnorm", "dyt"], data=["mnist"], seed=[0])]
             + [dict(model=["MnistDiT-S/4"], norm=["layernorm", "none"], data=["mnist"], seed=[seed])
                for seed in (0, 1, 2)]
             + [dict(model=["MnistDiT-S/4"], norm=["rmsnorm", "dyt"], data=["mnist"], seed=[0])],
        run_name="{model}-{norm}-seed{seed}",
        measure=mnist_study.measure,
        measure_args={},
        report=mnist.preset_report,
    ),
    # When does LayerNorm hurt? (res/interventions/prediction.md): weight decay, dropout and a cap on
    # each block's output, MnistDiT-XS/4, layernorm and none, 3 seeds; the baseline is the mnist preset's XS
    # runs trained again, first (the reference of every read-out). In training order: every seed-0 pair
    # first, so that a stopped study leaves matched pairs of every condition.
    "interventions": dict(
        recipe="mnist",
        grid=[dict(intervention=[name], model=["MnistDiT-XS/4"], norm=["layernorm", "none"], data=["mnist"],
                   seed=[seed])
              for seed in (0, 1, 2) for name in ("baseline", "wd1", "cap4", "dropout0.3", "wd0.1")],
        run_name="{model}-{norm}-{intervention}-seed{seed}",
        measure=mnist_study.measure,
        measure_args={},
        report=mnist.interventions_report,
    ),
}


def grids(preset, seeds=None):
    """A preset's grids as a list (a preset names one grid or a list of them), seeds replaced by `seeds`
    when given."""
    listed = preset["grid"] if isinstance(preset["grid"], list) else [preset["grid"]]
    return [dict(grid, **({"seed": list(seeds)} if seeds is not None else {})) for grid in listed]


def runs(preset, seeds=None):
    """The preset's grids as [(run name, train_run cfg)], seeds replaced by `seeds` when given."""
    out = [run for grid in grids(PRESETS[preset], seeds) for run in _grid_runs(preset, grid)]
    return list(dict(out).items())  # once each, in first-listed order (--seeds repeats per-seed grids)


def _grid_runs(preset, grid):
    out = []
    axes = (grid.get("intervention", [None]), grid["model"], grid["data"], grid["norm"], grid["seed"])
    for intervention, model, data, norm, seed in itertools.product(*axes):
        cfg = dict(RECIPES[PRESETS[preset]["recipe"]], model=model, norm=norm, data=data, seed=seed,
                   **INTERVENTIONS.get(intervention, {}))
        name = PRESETS[preset]["run_name"].format(
            **dict(cfg, model=model.replace("/", "-"), intervention=intervention))
        out.append((name, cfg))
    return out
