"""Every training recipe of the repository, as plain values (no imports): the trainer's defaults of
train_toy.py and train.py, and RECIPES, what `--recipe NAME` of both and the presets of experiment.py
(presets.py names one by key) train with. A recipe holds every train_run key but the grid's (model, norm,
data, seed).
"""

# The toy study: the DiT recipe (AdamW, constant lr 1e-4, no weight decay, EMA 0.9999) at global batch 2048.
DEFAULTS = {
    "model": "ToyDiT/1", "norm": "layernorm", "global_batch_size": 2048, "lr": 1e-4, "ema_decay": 0.9999,
    "max_steps": 50_000, "ckpt_steps": "10000,50000", "ckpt_every": 0, "log_every": 100, "seed": 0,
    "diffusion_steps": 1000, "data": "zeros", "data_path": None, "image_size": None,
    # The interventions of the study, all off in DiT's recipe: AdamW's decoupled weight decay (on every
    # trainable parameter, as AdamW(model.parameters()) gives it), dropout in every attention and MLP, and
    # the cap on each block's output (models.cap_to_rms); 0 is off.
    "weight_decay": 0.0, "dropout": 0.0, "cap": 0.0,
}
# Real images (train.py): DiT's optimiser (AdamW, constant lr, no weight decay) on the offline MNIST subset,
# at a batch a 2-core CPU trains in hours. The learning rate is 1e-3, not DiT's 1e-4: at 1e-4 a 10k-step
# MnistDiT-XS/4 still drew no recognisable digit (res/mnist/pilot/). The EMA decay is 0.999, not 0.9999:
# over a 10k-step run DiT's decay would still weight the initial weights by e^-1 at the end.
IMAGE_DEFAULTS = {
    **DEFAULTS, "model": "MnistDiT-S/4", "global_batch_size": 64, "lr": 1e-3, "ema_decay": 0.999,
    "max_steps": 10_000, "ckpt_steps": "", "ckpt_every": 1000, "data": "mnist",
}
# The training recipes: every train_run key but the grid's. The paper's is the trainer's DEFAULTS (DiT's
# recipe at batch 2048 for 50k steps); each adds the checkpoints it keeps.
PAPER = {k: v for k, v in DEFAULTS.items() if k not in ("model", "norm", "data", "seed", "data_path")}
RECIPES = {
    # Real images: the trainer's IMAGE_DEFAULTS (DiT's optimiser on the offline MNIST subset, batch 64,
    # EMA 0.999, 10k steps, a checkpoint every 1k).
    "mnist": {k: v for k, v in IMAGE_DEFAULTS.items()
              if k not in ("model", "norm", "data", "seed", "data_path")},
    "paper": dict(PAPER, ckpt_every=5000),
    # The CPU recipe trades the study's batch (8x fewer samples per step) and learning rate (10x larger) for
    # a 10x shorter run. Its EMA decay keeps the study's EMA horizon relative to the run length: 5 time
    # constants at the end (50k x 1e-4 = 5k x 1e-3) and 1 at the first checkpoint (10k x 1e-4 = 1k x 1e-3).
    "cpu": dict(PAPER, global_batch_size=256, lr=1e-3, ema_decay=0.999, max_steps=5000,
                ckpt_steps="1000,2000,3000,4000,5000"),
    # The 4-norm study's shorter CPU recipe: 48 runs in under an hour on 2 cores; the EMA keeps 6 time
    # constants at the end (3000 x 0.002). Still short of convergence: the errors may still fall at the end.
    "cpu-short": dict(PAPER, global_batch_size=128, lr=1e-3, ema_decay=0.998, max_steps=3000,
                      ckpt_steps="500,1000,1500,2000,2500,3000"),
    # The tests: a 2-block model, seconds.
    "tiny": dict(PAPER, global_batch_size=16, lr=1e-3, ema_decay=0.9, max_steps=20, ckpt_steps="10,20",
                 log_every=2),
}
