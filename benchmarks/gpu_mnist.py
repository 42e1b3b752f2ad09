"""The MNIST ladder in one process: every run trained side by side, then measured and reported.

    python benchmarks/gpu_mnist.py --out gpu_out/mnist                 # one CUDA GPU, the whole ladder
    python benchmarks/gpu_mnist.py --tiny --device cpu --out /tmp/m    # the test's version: seconds on a CPU
    python benchmarks/gpu_mnist.py --preset interventions --sizes S --seeds 0 --out gpu_out/interventions

The ladder: MnistDiT-XS/4, -S/4, -B/4, -L/4 x (layernorm and none at seeds 0-2, rmsnorm and dyt at seed 0),
32 runs of the mnist recipe (ditnorm/presets.py RECIPES["mnist"]: batch 64, 10k steps, a checkpoint every
1k). Each run is what `experiment.py train --preset mnist` trains: the same trainer functions
(build_training_state, diffusion_loss and optimizer_step, the same (seed, step) batches and class dropout,
trainer.save),
so its checkpoints are the trainer's. The runs advance one step each in turn, each on its own CUDA stream,
so that the GPU overlaps the small kernels of one run with the next run's while Python launches them.
With --preset interventions the ladder is instead the interventions study (res/interventions/prediction.md:
baseline, weight decay 0.1 and 1.0, dropout 0.3, the cap 4, for layernorm and none) at the larger sizes;
its dropout masks come from the one process's global RNG, which the runs share, so a run's masks are not
those that experiment.py would draw for it alone. Then ditnorm/mnist_study.measure_run measures each run
into OUT/runs/<run>/measures.csv and ditnorm/studies/mnist.report writes OUT/results.md and
OUT/curves.png: the small statistics to commit.

NEVER RUN ON A GPU; the estimate below is arithmetic, not a measurement. FLOPs per training step at batch
64, forward + backward, as benchmarks/bench_image.py counts them (FlopCounterMode): XS 3.8, S 22.6, B 120,
L 404 GFLOP, in fp32 (TF32 off, as in the trainer). The 8 runs of a size for 10k steps: XS 0.3, S 1.8,
B 9.6, L 32 PFLOP; 44 PFLOP in all. An H200 does about 67 TFLOP/s in fp32 without tensor cores; at a
conservative 30% (20 TFLOP/s) that is about 37 minutes, L alone 27 of them. Small models are bound by
kernel launches instead: about 500 per step at ~5 us is 2.5 ms per run-step, 8 runs x 10k steps = about
200 s per size whatever its width. Taking the larger of the two per size: XS 200 s, S 200 s, B 480 s,
L 1620 s. So the whole ladder does NOT fit 10 minutes of device time (about 42 minutes); `--sizes XS,S`
(about 7 minutes) does, and so does the interventions' seed 0 at S (10 runs, about 250 s); B would need
CUDA graphs or batching runs of one size into one model.
Measuring adds about 1.5e5 forward passes per run (NLL over 500 held-out images x 20 timesteps at 6
checkpoints, precision 2 x 2 x 1e4, 500 samples x 100 steps, the ablation), and runs on the CPU:
measure_run loads checkpoints with load_for_sampling's default device (cpu).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusion import create_diffusion  # noqa: E402
from ditnorm import mnist_study  # noqa: E402
from ditnorm.data import rank_batches  # noqa: E402
from ditnorm.images import load_image_data  # noqa: E402
from ditnorm.presets import runs as preset_runs  # noqa: E402
from ditnorm.studies import mnist as mnist_report  # noqa: E402
from ditnorm.trainer import build_training_state, diffusion_loss, optimizer_step, save  # noqa: E402

SIZES = {"XS": "MnistDiT-XS/4", "S": "MnistDiT-S/4", "B": "MnistDiT-B/4", "L": "MnistDiT-L/4"}
NORM_SEEDS = {"layernorm": (0, 1, 2), "none": (0, 1, 2), "rmsnorm": (0,), "dyt": (0,)}
# The test's ladder: one size, two runs, four steps, measured on 20 held-out images with few samples.
TINY = dict(sizes=("XS",), norm_seeds={"layernorm": (0,), "none": (0,)}, max_steps=4, ckpt_every=2,
            heldout=20, measure_args=dict(sample_steps=2, per_class=1, num_inputs=50))
FULL = dict(sizes=tuple(SIZES), norm_seeds=NORM_SEEDS, max_steps=None, ckpt_every=None, heldout=None,
            measure_args={})


def ladder(sizes, norm_seeds, max_steps=None, ckpt_every=None, preset="mnist"):
    """[(run name, trainer cfg)]: the preset's MnistDiT-XS/4 runs (those of norm_seeds' norms and seeds)
    at each size, with its recipe and run names."""
    given = {"max_steps": max_steps, "ckpt_every": ckpt_every}
    given = {k: v for k, v in given.items() if v is not None}
    runs = []
    for size in sizes:
        model = SIZES[size]
        for name, cfg in preset_runs(preset):
            if cfg["model"] == SIZES["XS"] and cfg["seed"] in norm_seeds.get(cfg["norm"], ()):
                runs.append((name.replace("MnistDiT-XS-4", model.replace("/", "-"), 1),
                             dict(cfg, **given, model=model)))
    return runs


class Run:
    """One run's training state and its batches, advanced one step at a time."""

    def __init__(self, name, cfg, folder, images, device):
        self.name, self.cfg, self.dir = name, cfg, Path(folder)
        self.model, self.ema, self.averages, self.optimizer = build_training_state(cfg, {}, None, device, 0)
        self.diffusion = create_diffusion(timestep_respacing="", diffusion_steps=cfg["diffusion_steps"])
        self.model_config = {"model": cfg["model"], **self.model.config}
        self.images, self.device = images, device
        shape = (self.model.config["in_channels"], self.model.config["input_size"],
                 self.model.config["input_size"])
        self.batches = rank_batches(cfg["seed"], range(1, cfg["max_steps"] + 1), cfg["global_batch_size"],
                                    0, 1, self.diffusion.num_timesteps, shape, device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.losses = []
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        config = {"train_args": cfg, "model_config": self.model_config, "device": str(device),
                  "step_path": "plain", "trained_by": "benchmarks/gpu_mnist.py"}
        (self.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def advance(self, step):
        t, noise = next(self.batches)
        x, y, drop = self.images.batch(self.cfg["seed"], step, self.cfg["global_batch_size"], 0, 1,
                                       self.device, self.model.config["class_dropout_prob"])
        loss = diffusion_loss(self.model, self.diffusion, x, t, noise, y, drop)
        optimizer_step(loss, self.model, self.ema, self.optimizer, self.cfg["ema_decay"], 1)
        self.losses.append(loss.detach())
        self.averages.update(step)

    def save(self, step):
        """Save the checkpoint of `step`; returns why not (non-finite weights, a failed write) or None."""
        problem = save(self.dir / "checkpoints" / f"{step:07d}.pt", step, self.cfg, self.model_config,
                       self.model, self.ema, self.averages, self.optimizer)
        return problem and problem[0]


def train(runs, device, log):
    """Advance every run one step in turn (each on its own CUDA stream) up to the common max_steps."""
    max_steps, every = runs[0].cfg["max_steps"], runs[0].cfg["ckpt_every"]
    start = time.perf_counter()
    for step in range(1, max_steps + 1):
        for run in runs:
            if run.stream is None:
                run.advance(step)
            else:
                with torch.cuda.stream(run.stream):
                    run.advance(step)
        if step % every == 0 or step == max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for run in list(runs):
                losses = torch.stack(run.losses).tolist()
                run.losses = []
                bad = [v for v in losses if not math.isfinite(v)]
                problem = f"loss {bad[0]} before step {step}" if bad else run.save(step)
                if problem:
                    log(f"{run.name}: {problem}; the run stops here")
                    runs.remove(run)
                    continue
                log(f"{run.name} step {step}: mean loss {sum(losses) / len(losses):.5f}")
            log(f"step {step}: {time.perf_counter() - start:.1f} s of training so far")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the runs (OUT/train/) and statistics "
                        "(OUT/runs/, OUT/results.md)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help="comma-separated, of XS,S,B,L (default: all)")
    parser.add_argument("--preset", choices=("mnist", "interventions"), default="mnist",
                        help="the norms ladder, or the interventions study (default: mnist)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of layernorm and none "
                        "(default: 0,1,2)")
    parser.add_argument("--tiny", action="store_true", help="one size, two runs, four steps, a small measure")
    parser.add_argument("--skip-measure", action="store_true")
    args = parser.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: pass comma-separated seeds of 0, 1, 2")
    norm_seeds = dict(NORM_SEEDS, layernorm=seeds, none=seeds)
    setting = TINY if args.tiny else dict(FULL, sizes=tuple(args.sizes.split(",")), norm_seeds=norm_seeds)
    unknown = [s for s in setting["sizes"] if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {', '.join(unknown)}; choose of {', '.join(SIZES)}")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA here; pass --device cpu (with --tiny for a quick check)")
        # As the trainer's CUDA path: TF32's ~1e-3 error is the size of the effects the study measures.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    images = load_image_data("mnist")
    plan = ladder(setting["sizes"], setting["norm_seeds"], setting["max_steps"], setting["ckpt_every"],
                  args.preset)
    log(f"{len(plan)} runs side by side on {device}: {', '.join(name for name, _ in plan)}")
    runs = [Run(name, cfg, out / "train" / name, images, device) for name, cfg in plan]
    train(list(runs), device, log)
    if args.skip_measure:
        return
    ctx = mnist_study.context()
    if setting["heldout"]:
        ctx = dict(ctx, x=ctx["x"][:setting["heldout"]], y=ctx["y"][:setting["heldout"]])
    start = time.perf_counter()
    for run in runs:
        mnist_study.measure_run(run.dir, out / "runs" / run.name, ctx, final_step=run.cfg["max_steps"],
                                log=log, **setting["measure_args"])
    log(f"measured in {time.perf_counter() - start:.1f} s")
    print(mnist_report.report(out))


if __name__ == "__main__":
    main()
