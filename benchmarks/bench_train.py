"""Time the repository's training step against a straightforward official-style step.

    python benchmarks/bench_train.py                       # CPU, ToyDiT/1, batch 2048, fp32
    python benchmarks/bench_train.py --threads 1 --repeats 20
    python benchmarks/bench_train.py --ddp                 # 2 gloo ranks x 1 thread vs 1 rank x 2 threads
    python benchmarks/bench_train.py --profile             # also: the repo step's time per op
    python benchmarks/bench_train.py --device cuda         # CUDA: official-style eager vs both CUDA-graph
                                                           # steps, each also without the forms for small
                                                           # shapes (fast/small_shapes.py): steps/s,
                                                           # 50k-step projection, and a check of each
                                                           # against the CPU step
    python benchmarks/bench_train.py --device cuda --no-generic \
        --compile-modes default,default+combo_kernels      # the compiled step under two compile settings
Both steps start from the same weights and see the same inputs; repetitions alternate between them after
a warm-up, and the medians are compared. FLOPs are counted analytically (see `model_flops`).
"""

import argparse
import copy
import functools
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

import fast.train_step  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from fast import compile_options, make_optimizer, make_train_step  # noqa: E402
from models import build_model  # noqa: E402


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


def build_steps(model, device, make):
    """A fresh copy of model on device with its EMA, AdamW (DiT recipe) and the step built by `make`.

    The repository's step gets train_toy.py's optimizer (make_optimizer: fused AdamW); the official-style
    step keeps AdamW's default implementation, as the official training script does."""
    model = copy.deepcopy(model).to(device)
    if make is make_official_step:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    else:
        opt = make_optimizer(model.parameters(), 1e-4)
    return model, make(model, copy.deepcopy(model).requires_grad_(False), create_diffusion(""), opt,
                       ema_decay=0.9999)


def bench_cpu(args):
    """Alternate the official-style step and the repository's step; print medians and the ratio."""
    base_model = trained_like(args.model, "layernorm")
    cfg = base_model.config
    official, official_step = build_steps(official_model_from(base_model), "cpu", make_official_step)
    setup = time.perf_counter()
    repo, repo_step = build_steps(base_model, "cpu", make_train_step)
    setup = time.perf_counter() - setup  # the fast path's proof against the model included
    inputs = toy_inputs(cfg, args.batch, "cpu")
    loss_official, loss_repo = official_step(*inputs), repo_step(*inputs)
    loss_err = abs(loss_repo.item() - loss_official.item()) / abs(loss_official.item())
    for _ in range(args.warmup):
        official_step(*inputs)
        repo_step(*inputs)
    times = {"official": [], "repo": []}
    for _ in range(args.repeats):
        for name, step in (("official", official_step), ("repo", repo_step)):
            t0 = time.perf_counter()
            step(*inputs)
            times[name].append(time.perf_counter() - t0)
    peak = matmul_gflops("cpu")
    flops = model_flops(cfg, args.batch)
    official_s, repo_s = statistics.median(times["official"]), statistics.median(times["repo"])
    print(f"{args.model} batch {args.batch} fp32, {torch.get_num_threads()} threads, {args.repeats} "
          f"alternating repeats after {args.warmup} warm-up; repo path: {repo_step.path}")
    print(f"first-step loss: official {loss_official.item():.7f}  repo {loss_repo.item():.7f}  "
          f"(relative difference {loss_err:.1e})")
    print(f"model FLOPs per step (matmuls, fwd+bwd): {flops / 1e9:.2f} GFLOP; "
          f"large fp32 matmul here: {peak:.0f} GFLOP/s")
    print("| step | median ms | GFLOP/s | steps/s | 50k steps |")
    print("|---|---|---|---|---|")
    for name, sec in (("official-style", official_s), ("repository", repo_s)):
        print(f"| {name} | {sec * 1e3:.1f} | {flops / sec / 1e9:.0f} | {1 / sec:.1f} | "
              f"{50_000 * sec / 3600:.2f} h |")
    print(f"speed-up: {official_s / repo_s:.2f}x; set-up of the repository's step (copy, optimizer, and "
          f"the fast path's check against the model): {setup:.2f} s, not in the step times")
    if args.profile:
        profile_repo_step(repo_step, inputs)


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


def _cuda_seconds(step, inputs, steps):
    """Mean seconds per step over `steps` back-to-back steps (the GPU queue drained before and after)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*inputs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _print_kernels(step, inputs, what, steps=5, top=15):
    """Profile `steps` calls of step (already warm) and print its GPU kernels: the total kernel time and
    kernel count per step, and the `top` kernels by time. A CUDA-graph replay's kernels are recorded too."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(*inputs)
        torch.cuda.synchronize()

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    rows = sorted((e for e in prof.key_averages() if device_us(e) > 0), key=device_us, reverse=True)
    if not rows:
        print(f"GPU kernels of {what}: none recorded by the profiler")
        return
    total = sum(device_us(e) for e in rows) / steps / 1e3
    launches = sum(e.count for e in rows) / steps
    print(f"GPU kernels of {what}: {total:.3f} ms of kernel time and {launches:g} kernels per step")
    print("| kernel | ms per step | calls per step |")
    print("|---|---:|---:|")
    for e in rows[:top]:
        print(f"| {e.key[:90]} | {device_us(e) / steps / 1e3:.3f} | {e.count / steps:g} |")


def profile_cuda_kernels(base_model, inputs, compiled_steps):
    """Where the GPU time of a step goes, per kernel, summed over the step: the plain step run eagerly (the
    kernels that the plain CUDA graph replays; eager launches add gaps between kernels, not kernel time),
    then each already captured compiled step in `compiled_steps` (name -> step), replaying its graphs.
    A failed profile prints one line and the others go on."""
    try:
        _, step = build_steps(base_model, "cuda", functools.partial(make_train_step, fast="off"))
        for _ in range(3):
            step(*inputs)
        _print_kernels(step, inputs, "the plain step")
    except Exception as error:
        print(f"profile of the plain step FAILED: {type(error).__name__}: {str(error).splitlines()[0]}")
    for name, step in compiled_steps.items():
        try:
            _print_kernels(step, inputs, f"{name} (graph replays)", top=25)
        except Exception as error:
            print(f"profile of {name} FAILED: {type(error).__name__}: {str(error).splitlines()[0]}")


def cuda_config_name(compile_cuda, small_forms, setting):
    name = "cuda-graph-compiled" if compile_cuda else "cuda-graph"
    return name + ("" if small_forms else ", generic forms") + (f", {setting}" if setting else "")


def cuda_configs(args):
    """(compile_cuda, small-shape forms on, compile setting) of each CUDA-graph step to time."""
    configs = [(False, True, None)] + [(True, True, mode) for mode in args.compile_modes]
    if not args.no_generic:
        configs += [(False, False, None), (True, False, None)]
    return configs


def bench_cuda(args):
    """The official-style eager step and the CUDA-graph steps (plain model; torch.compile'd forward and
    loss under each of --compile-modes), without --no-generic each also without fast/small_shapes.py's
    forms ("generic forms"), built in this one process: setup time, steps/s and the 50k-step projection; then
    each graph step with the CUDA forms against the CPU step."""
    base_model = trained_like(args.model, "layernorm")
    cfg = base_model.config
    inputs = toy_inputs(cfg, args.batch, "cuda")
    steps, setup = {}, {}
    # Every compiled step here compiles the same loss code for another model (a dynamo cache entry each,
    # the CPU checks' included); past the limit (8) dynamo would stop compiling it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    official = official_model_from(base_model)
    _, steps["official-style (eager)"] = build_steps(official, "cuda", make_official_step)
    default_reason = fast.train_step.small_shapes_reason
    for compile_cuda, small_forms, setting in cuda_configs(args):
        t0 = time.perf_counter()
        make = functools.partial(make_train_step, compile_cuda=compile_cuda, compile_mode=setting)
        name = cuda_config_name(compile_cuda, small_forms, setting)
        # make_train_step asks small_shapes_reason whether the forms apply; the generic steps are told no.
        if not small_forms:
            fast.train_step.small_shapes_reason = lambda model: "generic forms (benchmark)"
        try:
            _, step = build_steps(base_model, "cuda", make)
            for _ in range(5):  # 3 eager warm-up steps (compilation in the first), the capture, a replay
                step(*inputs)
            torch.cuda.synchronize()
        except Exception as error:  # report it and time the others
            print(f"{name}: FAILED: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        finally:
            fast.train_step.small_shapes_reason = default_reason
        steps[name], setup[name] = step, time.perf_counter() - t0
    for step in steps.values():  # warm-up, then alternate
        _cuda_seconds(step, inputs, 20)
    num = max(args.repeats, 300)
    times = {name: [] for name in steps}
    for _ in range(3):
        for name, step in steps.items():
            times[name].append(_cuda_seconds(step, inputs, num if "graph" in name else num // 10))
    flops = model_flops(cfg, args.batch)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.model} batch {args.batch} fp32 "
          f"(TF32 off); median of 3 alternated runs of {num} steps (official-style: {num // 10})")
    print(f"large fp32 matmul here: {matmul_gflops('cuda') / 1e3:.1f} TFLOP/s; model FLOPs per step "
          f"{flops / 1e9:.2f} GFLOP")
    print("| step | setup s (warm-up, compile, capture) | ms/step | steps/s | TFLOP/s | 50k steps |")
    print("|---|---|---|---|---|---|")
    for name, runs in times.items():
        sec = statistics.median(runs)
        print(f"| {name} | {setup.get(name, 0):.1f} | {sec * 1e3:.3f} | {1 / sec:.0f} | "
              f"{flops / sec / 1e12:.2f} | {50_000 * sec:.0f} s |")
    # Correctness: the same 6 steps (warm-up, capture, replays) on CUDA and on CPU from the same weights.
    for compile_cuda, _, setting in (c for c in cuda_configs(args) if c[1]):
        name = cuda_config_name(compile_cuda, True, setting)
        if name not in steps:
            continue
        cuda_model, cuda_step = build_steps(base_model, "cuda", functools.partial(
            make_train_step, compile_cuda=compile_cuda, compile_mode=setting))
        cpu_model, cpu_step = build_steps(base_model, "cpu", make_train_step)
        worst_loss = 0.0
        for seed in range(6):
            batch = toy_inputs(cfg, args.batch, "cpu", seed=seed)
            loss_cpu = cpu_step(*batch).item()
            loss_gpu = cuda_step(*[x.cuda() for x in batch]).item()
            worst_loss = max(worst_loss, abs(loss_gpu - loss_cpu) / abs(loss_cpu))
        pairs = zip(cuda_model.parameters(), cpu_model.parameters(), strict=True)
        worst_param = max(((a.detach().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                          for a, b in pairs)
        verdict = "OK" if worst_loss < 1e-4 and worst_param < 1e-4 else "MISMATCH"
        print(f"{name} vs CPU ({cpu_step.path}) after 6 steps: loss rel. diff {worst_loss:.1e}, "
              f"params rel. diff {worst_param:.1e}: {verdict}")
    if args.profile:
        profile_cuda_kernels(base_model, inputs, {name: s for name, s in steps.items() if "compiled" in name})


def _ddp_rank(rank, world_size, init_file, args, out):
    """One rank of the DDP timing: 1 thread, its share of the global batch."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    base_model = trained_like(args.model, "layernorm")
    model = copy.deepcopy(base_model)
    step = make_train_step(model, copy.deepcopy(model).requires_grad_(False), create_diffusion(""),
                           make_optimizer(model.parameters(), 1e-4), ema_decay=0.9999,
                           world_size=world_size)
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
        _, step = build_steps(base_model, "cpu", make_train_step)
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
    parser.add_argument("--compile-modes", type=lambda text: [None if m == "default" else m
                                                              for m in text.split(",")],
                        default=[None], help="CUDA: the compile settings to time, comma-separated (default: "
                        "default; e.g. default,max-autotune-no-cudagraphs,default+combo_kernels: see "
                        "fast.compile_options)")
    parser.add_argument("--no-generic", action="store_true",
                        help="CUDA: leave out the steps with the generic forms")
    parser.add_argument("--profile", action="store_true",
                        help="also time the repo step per op (CPU), or per kernel the plain step and "
                             "the compiled steps (CUDA)")
    args = parser.parse_args()
    if args.batch < 2 or args.batch % 2:
        parser.error("--batch must be an even number >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; run without it to benchmark the CPU")
    for setting in args.compile_modes:
        try:
            compile_options(setting)
        except ValueError as error:
            parser.error(f"--compile-modes: {error}")
    if len(set(args.compile_modes)) < len(args.compile_modes):
        parser.error("--compile-modes: a setting is named twice")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ddp:
        bench_ddp(args)
    elif args.device == "cuda":
        bench_cuda(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
