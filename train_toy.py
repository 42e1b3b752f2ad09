"""Train a toy DiT to generate constant-zero 2x2x2 "images", with or without LayerNorm.

    python train_toy.py --norm none                                   # one process (GPU if present)
    torchrun --nproc_per_node=8 train_toy.py --norm layernorm         # ranks: NCCL on GPUs, gloo on CPU
    python train_toy.py --norm none --recipe cpu                      # shows the effect on a 2-core CPU
    python train_toy.py --resume results/000-ToyDiT-1-none --max-steps 60000   # continue a run
    python train_toy.py --norm dyt --fast off                         # the plain model, no fast path

The training loop is ditnorm/trainer.py, shared with train.py (real images). Each sample's timestep and
noise come from (seed, step, global sample index), so a global batch trains identically on any number of
ranks and a resumed run continues exactly, bit for bit, at the same thread count. No checkpoint with a NaN
or an infinity in its weights is ever saved, and a run folder appears only once training can start.
"""

from ditnorm.trainer import DEFAULTS, main

if __name__ == "__main__":
    main(defaults=DEFAULTS, prog="train_toy.py", description=__doc__)
