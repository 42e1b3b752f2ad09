"""What the MNIST study's later measure groups (mnist_study.LAST2) cost on one checkpoint, and what they read.

    .venv/bin/python benchmarks/bench_measure.py results/<preset>/<run>/checkpoints/0010000.pt
    .venv/bin/python benchmarks/bench_measure.py CKPT --weights ema --strata 20,40 --spacing uniform

Each group of LAST2 is measured once per weights kind, as `experiment.py measure` would, and timed; with
--strata, nll2's bound is measured with each count of geometric strata instead (standard errors and time).
Nothing is written.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditnorm import image_metrics as metrics  # noqa: E402
from ditnorm import mnist_study  # noqa: E402
from ditnorm.checkpoint import diffusion_of, load_for_sampling  # noqa: E402


def _took(start, cpu):
    """Wall and CPU seconds since (start, cpu): on a shared machine the CPU time is what one free core
    would take (with one thread)."""
    return f"{time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="one of our MNIST checkpoints (.pt)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--groups", default=",".join(sorted(set(sum(mnist_study.LAST2.values(), ())))),
                        help="comma-separated groups of mnist_study.LAST2 (default: all)")
    parser.add_argument("--weights", default="raw,ema", help="comma-separated weights (default: raw,ema)")
    parser.add_argument("--strata", default="", help="comma-separated strata counts: time nll2's bound "
                        "with each instead of the groups")
    parser.add_argument("--spacing", choices=("geometric", "uniform"), default="geometric",
                        help="the strata's widths with --strata (default: geometric, nll2's)")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        parser.error(f"{args.checkpoint}: no such checkpoint; pass a .pt file from a run's checkpoints/")
    torch.set_num_threads(args.threads)
    ctx = mnist_study.context()
    for kind in args.weights.split(","):
        model, _, train_args = load_for_sampling(args.checkpoint, weights=kind, download=False)
        diffusion, sampler = diffusion_of(train_args), diffusion_of(train_args, 100)
        with torch.no_grad():
            if args.strata:
                for count in map(int, args.strata.split(",")):
                    start, cpu = time.perf_counter(), time.process_time()
                    out = metrics.nll_fresh(model, diffusion, ctx["x"], ctx["y"], strata=count,
                                            spacing=args.spacing)
                    print(f"{kind} nll2 {count} {args.spacing} strata: " + ", ".join(
                        f"{clip} {v['nll_bpd']:.4f} +- {v['nll_se']:.4f} (draws {v['nll_draw_se']:.4f})"
                        for clip, v in out.items())
                        + f" ({_took(start, cpu)})", flush=True)
                continue
            for group in args.groups.split(","):
                if group not in mnist_study.LAST2[kind]:
                    continue
                start, cpu = time.perf_counter(), time.process_time()
                rows = mnist_study._group_rows(group, model, diffusion, sampler, ctx, per_class=50,
                                               num_inputs=10_000)
                shown = [f"{q} {v:.4g}" for q, v, _ in rows if group != "outliers" or "ratio_p" in q]
                print(f"{kind} {group}: {_took(start, cpu)} | " + ", ".join(shown), flush=True)


if __name__ == "__main__":
    main()
