"""Time the repository's training step against a straightforward official-style step.

    python benchmarks/bench_train.py                       # CPU, ToyDiT/1, batch 2048, fp32
    python benchmarks/bench_train.py --threads 1 --repeats 20
    python benchmarks/bench_train.py --ddp                 # 2 gloo ranks x 1 thread vs 1 rank x 2 threads
    python benchmarks/bench_train.py --profile             # also: the repo step's time per op (CPU)
    python benchmarks/bench_train.py --isa native,avx2     # the C kernels built for each, side by side
    python benchmarks/bench_train.py --device cuda         # the same on CUDA (the repository's step is the
                                                           # trainer's plain one there)
The repository's steps are the trainer's (ditnorm.trainer: fast_loss, then optimizer_step): with --fast
off the plain step,
with --fast auto fast/'s C step once proven (not gated by its speed here: this script is the timing), its
kernels built for each --isa. Every step starts from the same weights and sees the same inputs;
repetitions alternate between them (the order flips every repeat) after a warm-up, and medians are
compared, as ratios within the run. FLOPs are counted
analytically (see `model_flops`).
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from official_style import make_official_step, official_model_from  # noqa: E402, I001

from diffusion import create_diffusion  # noqa: E402
from ditnorm.trainer import diffusion_loss, fast_loss, optimizer_step  # noqa: E402
from fast import make_optimizer  # noqa: E402
from fast.kernels import ISA_ENV, ISA_FLAGS, cpu_flags  # noqa: E402
from models import build_model  # noqa: E402


SHOWN_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "amx_tile"}


def model_flops(cfg, batch):
    """Matmul FLOPs of one training step: 3x the forward (backward = d input + d weight).

    Forward per sample: every Linear (2 * in * out per token; the conv patch embedding counted as a Linear
    over the patch), the adaLN Linears and the timestep MLP (once per sample), and attention's two
    T x T x d products per head. Elementwise work (norms, GELU, softmax, loss, AdamW, EMA) is not counted.
    """
    D, depth, H = cfg["hidden_size"], cfg["depth"], cfg["num_heads"]
    T = (cfg["input_size"] // cfg["patch_size"]) ** 2
    F = int(D * cfg["mlp_ratio"])
    P = cfg["in_channels"] * cfg["patch_size"] ** 2
    O = P * (2 if cfg["learn_sigma"] else 1)
    per_token = depth * (D * 3 * D + D * D + 2 * D * F) + P * D + D * O
    attention = depth * H * 2 * T * T * (D // H)
    per_sample = T * per_token + depth * D * 6 * D + D * 2 * D + 256 * D + D * D + attention
    return 3 * 2 * batch * per_sample


def matmul_gflops(device, size=2048, repeats=5):
    """fp32 GFLOP/s of one large square matmul (the machine's practical peak for this run)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(times[2:]) / 1e9


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def toy_inputs(cfg, batch, device, seed=0):
    """x_start (the study's constant-zero data), t, noise, y."""
    g = torch.Generator().manual_seed(seed)
    size = (batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    return [torch.zeros(size).to(device), torch.randint(0, 1000, (batch,), generator=g).to(device),
            torch.randn(size, generator=g).to(device), torch.zeros(batch, dtype=torch.long).to(device)]


def trained_like(name, norm, seed=0):
    """A model with weights moved off the adaLN-Zero initialisation (so no gradient is trivially zero)."""
    torch.manual_seed(seed)
    model = build_model(name, norm=norm)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def repository_step(model, ema, diffusion, optimizer, ema_decay, world_size=1, fast="auto"):
    """The trainer's step for the toy data, as train_toy.py builds it (--fast auto: fast/'s C loss once
    proven; no batch size, so not timed against the plain one: this script does the timing)."""
    loss_fn, _ = fast_loss(fast, model, diffusion, class_dropout=False)

    def step(x_start, t, noise, y):
        if loss_fn is None:
            loss = diffusion_loss(model, diffusion, x_start, t, noise, y)
        else:
            loss = loss_fn(x_start, t, noise, y)
        optimizer_step(loss, model, ema, optimizer, ema_decay, world_size)
        return loss.detach()

    step.path = getattr(loss_fn, "path", "plain")
    return step


def build_steps(model, device, make, isa=None, fast="auto"):
    """A fresh copy of model on device with its EMA, AdamW (DiT recipe) and the step built by `make`, its
    C kernels built for `isa` (fast/kernels.py; None: $DITNORM_FAST_ISA or native).

    The repository's step gets train_toy.py's optimizer (make_optimizer: fused AdamW); the official-style
    step keeps AdamW's default implementation, as the official training script does."""
    model = copy.deepcopy(model).to(device)
    if make is make_official_step:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        return model, make(model, copy.deepcopy(model).requires_grad_(False), create_diffusion(""), opt,
                           ema_decay=0.9999)
    opt = make_optimizer(model.parameters(), 1e-4)
    saved = os.environ.get(ISA_ENV)
    if isa:
        os.environ[ISA_ENV] = isa
    try:
        return model, make(model, copy.deepcopy(model).requires_grad_(False), create_diffusion(""), opt,
                           ema_decay=0.9999, fast=fast)
    finally:
        if saved is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = saved


def bench(args):
    """Alternate the official-style step, the trainer's plain step and the repository's step for each ISA
    target; print medians and the ratios."""
    device = args.device
    base_model = trained_like(args.model, "layernorm")
    cfg = base_model.config
    steps = {"official-style": build_steps(official_model_from(base_model), device, make_official_step)[1]}
    if device == "cpu":
        steps["trainer, --fast off"] = build_steps(base_model, device, repository_step, fast="off")[1]
    setups = {}
    for isa in args.isa if device == "cpu" else [None]:
        setup = time.perf_counter()
        step = build_steps(base_model, device, repository_step, isa=isa)[1]
        name = f"trainer, --fast auto ({step.path}{', ' + isa if isa and step.path != 'plain' else ''})"
        setups[name] = time.perf_counter() - setup  # the fast path's proof against the model included
        steps[name] = step
    inputs = toy_inputs(cfg, args.batch, device)
    first = {name: step(*inputs).item() for name, step in steps.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step(*inputs)
    times = {name: [] for name in steps}
    for r in range(args.repeats):
        order = list(steps.items())
        for name, step in order if r % 2 == 0 else order[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            step(*inputs)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    peak = matmul_gflops(device)
    flops = model_flops(cfg, args.batch)
    medians = {name: statistics.median(t) for name, t in times.items()}
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{args.model} batch {args.batch} fp32, {where}, {args.repeats} alternating repeats after "
          f"{args.warmup} warm-up; CPU flags include: {', '.join(sorted(cpu_flags() & SHOWN_FLAGS)) or '?'}; "
          f"PyTorch's CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    ref = first["official-style"]
    print("first-step loss (relative difference to the official-style one): "
          + ", ".join(f"{k} {loss:.7f} ({abs(loss - ref) / abs(ref):.1e})" for k, loss in first.items()))
    print(f"model FLOPs per step (matmuls, fwd+bwd): {flops / 1e9:.2f} GFLOP; "
          f"large fp32 matmul here: {peak:.0f} GFLOP/s")
    plain = medians.get("trainer, --fast off")
    print("| step | median ms | GFLOP/s | steps/s | 50k steps | vs official-style | vs --fast off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, sec in medians.items():
        print(f"| {name} | {sec * 1e3:.1f} | {flops / sec / 1e9:.0f} | {1 / sec:.1f} | "
              f"{50_000 * sec / 3600:.2f} h | {medians['official-style'] / sec:.2f}x | "
              f"{f'{plain / sec:.2f}x' if plain else '-'} |")
    for name, sec in setups.items():
        print(f"set-up of {name} (copy, optimizer, the fast path's check against the model): {sec:.2f} s, "
              "not in the step times")
    if args.profile and device == "cpu":
        profile_repo_step(steps[list(setups)[0]], inputs)


def profile_repo_step(step, inputs, steps=5):
    """Where the repository's step spends its time: torch.profiler's per-op table, per step.

    HybridLossFunction is the C forward, loss and backward of the whole network (adaLN vectors included;
    DiTFunction / DiTFunctionBackward when another loss runs through fused_model); everything else is
    PyTorch (timestep and label embedding, AdamW, EMA, small copies)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(*inputs)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / steps / 1e3
    print(f"profile of {steps} repository steps: {total:.1f} ms of self time per step (profiler included)")
    print("| op | ms per step | calls per step |")
    print("|---|---:|---:|")
    for e in rows[:12]:
        print(f"| {e.key} | {e.self_cpu_time_total / steps / 1e3:.2f} | {e.count / steps:g} |")


def _ddp_rank(rank, world_size, init_file, args, out):
    """One rank of the DDP timing: 1 thread, its share of the global batch."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    base_model = trained_like(args.model, "layernorm")
    model = copy.deepcopy(base_model)
    step = repository_step(model, copy.deepcopy(model).requires_grad_(False), create_diffusion(""),
                           make_optimizer(model.parameters(), 1e-4), 0.9999, world_size)
    share = args.batch // world_size
    inputs = [x[rank * share:(rank + 1) * share] for x in toy_inputs(base_model.config, args.batch, "cpu")]
    times = []
    for i in range(args.warmup + args.repeats):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        step(*inputs)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        torch.save(times, out)
    torch.distributed.destroy_process_group()


def bench_ddp(args):
    """2 gloo ranks x 1 thread vs 1 process x 2 threads and x 1 thread, same global batch."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_ddp_rank, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2, join=True)
        results["2 ranks x 1 thread (gloo)"] = statistics.median(torch.load(out))
    base_model = trained_like(args.model, "layernorm")
    inputs = toy_inputs(base_model.config, args.batch, "cpu")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        _, step = build_steps(base_model, "cpu", repository_step)
        times = []
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            step(*inputs)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        results[f"1 process x {threads} thread{'s' if threads > 1 else ''}"] = statistics.median(times)
    print(f"{args.model} global batch {args.batch}, repository step, {args.repeats} repeats (medians)")
    print("| setup | median ms |")
    print("|---|---|")
    for name, sec in results.items():
        print(f"| {name} | {sec * 1e3:.1f} |")
    ddp, single = results["2 ranks x 1 thread (gloo)"], results["1 process x 2 threads"]
    print(f"2-rank overhead over 1 process x 2 threads: {100 * (ddp / single - 1):+.0f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="ToyDiT/1")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--ddp", action="store_true", help="time 2 gloo ranks against 1 process (CPU)")
    parser.add_argument("--profile", action="store_true", help="also time the repo step per op (CPU)")
    parser.add_argument("--isa", default="native",
                        help="comma-separated instruction sets to build the C kernels for, each timed as its "
                        f"own step side by side ({', '.join(ISA_FLAGS)}; avx2 runs on an AVX-512 CPU too)")
    args = parser.parse_args()
    args.isa = [isa.strip() for isa in args.isa.split(",") if isa.strip()]
    if not args.isa or set(args.isa) - set(ISA_FLAGS):
        parser.error(f"--isa takes a comma-separated list of {', '.join(ISA_FLAGS)}")
    if args.batch < 2 or args.batch % 2:
        parser.error("--batch must be an even number >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; run without it to benchmark the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ddp:
        bench_ddp(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
