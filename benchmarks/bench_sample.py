"""Time toy sampling: fast.sample_toy against the plain diffusion.p_sample_loop.

    python benchmarks/bench_sample.py                     # 100 samples x 1000 ancestral steps, CPU
    python benchmarks/bench_sample.py --threads 1 --repeats 5
    python benchmarks/bench_sample.py --isa native,avx2     # the C kernels built for each, side by side
    python benchmarks/bench_sample.py --device cuda         # the CUDA-graph sampler against the eager loop
Both draw from the same seeded generator, so they must return the same samples (checked and printed);
repetitions alternate between the two and medians are compared.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion import create_diffusion  # noqa: E402
from fast import sample_toy  # noqa: E402
from fast.kernels import ISA_ENV, ISA_FLAGS  # noqa: E402
from models import build_model  # noqa: E402


def trained_like(name, seed=0):
    """A toy model with weights off the adaLN-Zero initialisation (whose output would be exactly zero)."""
    torch.manual_seed(seed)
    model = build_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="ToyDiT/1")
    parser.add_argument("--batch", type=int, default=100, help="number of samples")
    parser.add_argument("--steps", default="", help="timestep respacing ('' = all 1000 steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--isa", default="native",
                        help="comma-separated instruction sets to build the C kernels for, each timed as its "
                        f"own sampler side by side ({', '.join(ISA_FLAGS)}; avx2 runs on an AVX-512 CPU too)")
    args = parser.parse_args()
    args.isa = [isa.strip() for isa in args.isa.split(",") if isa.strip()]
    if not args.isa or set(args.isa) - set(ISA_FLAGS):
        parser.error(f"--isa takes a comma-separated list of {', '.join(ISA_FLAGS)}")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; run without it to benchmark the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = trained_like(args.model).to(args.device)
    diffusion = create_diffusion(args.steps)
    shape = (args.batch, model.config["in_channels"], model.config["input_size"], model.config["input_size"])
    y = torch.zeros(args.batch, dtype=torch.long, device=args.device)

    def plain():
        return diffusion.p_sample_loop(model, shape, model_kwargs={"y": y}, device=args.device,
                                       generator=torch.Generator().manual_seed(0))

    def fast_sampler(isa):
        def run():  # fast="proven": the C loop once checked, not gated by its speed (this is the timing)
            os.environ[ISA_ENV] = isa
            return sample_toy(model, diffusion, args.batch, generator=torch.Generator().manual_seed(0),
                              device=args.device, fast="proven")
        return run

    samplers = {"diffusion.p_sample_loop": plain}
    for isa in args.isa if args.device == "cpu" else ["native"]:
        samplers[f"fast.sample_toy{f' ({isa})' if args.device == 'cpu' else ''}"] = fast_sampler(isa)
    want = plain()  # also the warm-up
    errors = {name: ((run() - want).abs().max() / want.abs().max()).item() for name, run in samplers.items()}
    times = {name: [] for name in samplers}
    for r in range(args.repeats):
        order = list(samplers.items())
        for name, fn in order if r % 2 == 0 else order[::-1]:
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.model}: {args.batch} samples x {diffusion.num_timesteps} ancestral steps on {args.device}, "
          f"{torch.get_num_threads()} threads (PyTorch's CPU capability: "
          f"{torch.backends.cpu.get_cpu_capability()}), {args.repeats} alternating repeats; same generator, "
          "max relative difference to p_sample_loop: "
          + ", ".join(f"{name} {err:.1e}" for name, err in list(errors.items())[1:]))
    print("| sampler | median s | speed-up |")
    print("|---|---:|---:|")
    for name, sec in medians.items():
        print(f"| {name} | {sec:.2f} | {medians['diffusion.p_sample_loop'] / sec:.2f}x |")


if __name__ == "__main__":
    main()
