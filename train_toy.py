"""Train a toy DiT to generate constant-zero 2x2x2 "images", with or without LayerNorm.

    python train_toy.py --norm none                                   # one process (GPU if present)
    torchrun --nproc_per_node=8 train_toy.py --norm layernorm         # ranks: NCCL on GPUs, gloo on CPU
    python train_toy.py --norm none --recipe cpu                      # shows the effect on a 2-core CPU
    python train_toy.py --resume results/000-ToyDiT-1-none --max-steps 60000   # continue a run
    python train_toy.py --norm dyt --fast off                         # the plain model, no fast path

The loop is ditnorm/trainer.py, shared with train.py (real images): bit-exact resumes at the same thread
count, the same global batch on any number of ranks, no checkpoint with a non-finite weight.
"""

from ditnorm.trainer import DEFAULTS, main

if __name__ == "__main__":
    main(defaults=DEFAULTS, prog="train_toy.py", description=__doc__)
