"""Time the MNIST DiTs' training step against the machine's large-matmul rate, in one run.

    python benchmarks/bench_image.py                           # XS, S, B, L at batch 64; 1 and 2 threads;
                                                               # then the layout of two runs side by side
    python benchmarks/bench_image.py --models MnistDiT-S/4 --threads 1 --repeats 5 --layout-steps 0
    python benchmarks/bench_image.py --out benchmarks/cpu_image_DATE.md   # also write the output there

The step is the trainer's for real images: ditnorm.trainer's diffusion_loss and optimizer_step on
models.build_model, fused
AdamW (fast.make_optimizer), class dropout passed as force_drop_ids, a batch of the offline MNIST subset.
Each round times one 2048^3 fp32 matmul and then one step of every model (A B C ... A B C ...), so a
change of load from other processes falls on all of them alike; the table has medians over rounds.
FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one forward and backward (matmuls,
convolution, attention; elementwise work, AdamW and the EMA are not counted).

The layout part runs two copies of one model's step at 1 thread each in two processes, and one copy at 2
threads in one process, alternating, and compares the steps/s summed over processes.
"""

import argparse
import copy
import datetime
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusion import create_diffusion  # noqa: E402
from ditnorm.images import load_image_data  # noqa: E402
from ditnorm.trainer import diffusion_loss, optimizer_step  # noqa: E402
from fast import make_optimizer  # noqa: E402
from models import MNIST_MODELS, build_model  # noqa: E402


def matmul_seconds(a, b):
    t0 = time.perf_counter()
    a @ b
    return time.perf_counter() - t0


def training_state(name, seed=0):
    """(model, step, inputs) of the trainer's plain image step, weights moved off adaLN-Zero."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = create_diffusion(timestep_respacing="")
    optimizer = make_optimizer(model.parameters(), 1e-4)

    def step(x, t, noise, y, drop):
        loss = diffusion_loss(model, diffusion, x, t, noise, y, drop)
        optimizer_step(loss, model, ema, optimizer, 0.999, 1)
        return loss.detach()

    return model, diffusion, step


def batch_inputs(batch, seed=0):
    """(x_start, t, noise, y, drop) of one training step on the offline MNIST subset."""
    images = load_image_data("mnist")
    x, y, drop = images.batch(seed, 1, batch, 0, 1, "cpu", drop_prob=0.1)
    g = torch.Generator().manual_seed(seed)
    return x, torch.randint(0, 1000, (batch,), generator=g), torch.randn(x.shape, generator=g), y, drop


def step_flops(model, diffusion, inputs):
    """FLOPs of one forward and backward of the loss, as FlopCounterMode counts them."""
    x, t, noise, y, drop = inputs
    with FlopCounterMode(display=False) as counter:
        loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y, "force_drop_ids": drop},
                                         noise=noise)["loss"].mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_threads(args, threads):
    """Rows of the table at `threads` intra-op threads; prints them as they come."""
    torch.set_num_threads(threads)
    inputs = batch_inputs(args.batch)
    steps, flops = {}, {}
    for name in args.models:
        model, diffusion, step = training_state(name)
        flops[name] = step_flops(model, diffusion, inputs)
        steps[name] = (step, sum(p.numel() for p in model.parameters()))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times = {"matmul": [], **{k: [] for k in steps}}
    for _ in range(args.warmup + args.repeats):
        times["matmul"].append(matmul_seconds(a, b))
        for key, (step, _) in steps.items():
            t0 = time.perf_counter()
            step(*inputs)
            times[key].append(time.perf_counter() - t0)
    peak = 2 * 2048 ** 3 / statistics.median(times["matmul"][args.warmup:]) / 1e9
    rows = [f"| 2048^3 matmul | - | {threads} | {2 * 2048 ** 3 / 1e9:.1f} | "
            f"{statistics.median(times['matmul'][args.warmup:]) * 1e3:.0f} | {peak:.1f} | 100% | - |"]
    for key, (_, params) in steps.items():
        seconds = statistics.median(times[key][args.warmup:])
        rate = flops[key] / seconds / 1e9
        rows.append(f"| {key} | {params / 1e6:.2f}M | {threads} | {flops[key] / 1e9:.1f} "
                    f"| {seconds * 1e3:.0f} | {rate:.1f} | {100 * rate / peak:.0f}% | {1 / seconds:.2f} |")
    return rows


def layout_worker(name, threads, steps, batch, barrier, queue):
    torch.set_num_threads(threads)
    _, _, step = training_state(name)
    inputs = batch_inputs(batch)
    step(*inputs)  # warm-up
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*inputs)
    queue.put(steps / (time.perf_counter() - t0))


def layout(args, processes, threads):
    """Steps/s summed over `processes` processes of `threads` threads each, started together."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=layout_worker, args=(args.layout_model, threads, args.layout_steps,
                                                       args.batch, barrier, queue))
               for _ in range(processes)]
    for w in workers:
        w.start()
    rates = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return sum(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MNIST_MODELS), type=lambda s: s.split(","))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default="1,2", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--layout-model", default="MnistDiT-S/4")
    parser.add_argument("--layout-steps", type=int, default=10, help="steps per layout round; 0: skip")
    parser.add_argument("--layout-rounds", type=int, default=2)
    parser.add_argument("--out", help="also write the output, with date, machine and command, to this file")
    args = parser.parse_args()
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    machine = " ".join(cpu.split()[2:]) or platform.processor()
    say(f"date {datetime.datetime.now():%Y-%m-%d %H:%M}; {machine}, "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}; niceness {os.nice(0)}; load average at start "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    say(f"command: python {' '.join(sys.argv)}")
    say(f"batch {args.batch}, fp32, {args.repeats} rounds after {args.warmup} warm-up; medians")
    say()
    say("| step | params | threads | GFLOP | median ms | GFLOP/s | of matmul | steps/s |")
    say("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        for row in bench_threads(args, threads):
            say(row)
    if args.layout_steps:
        say()
        say(f"layout, {args.layout_model}, {args.layout_steps} steps per process per round, alternating:")
        say("| round | 2 processes x 1 thread, steps/s summed | 1 process x 2 threads, steps/s | ratio |")
        say("|---|---|---|---|")
        for r in range(args.layout_rounds):
            two, one = layout(args, 2, 1), layout(args, 1, 2)
            say(f"| {r} | {two:.3f} | {one:.3f} | {two / one:.2f} |")
    say()
    say(f"load average at end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("# MNIST DiT training step on the CPU\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
