"""fast/train_step.py and fast/fused_dit.py: the hand-written DiT gives the plain model's loss and gradients;
the proven step updates parameters, EMA and all-reduce as the trainer's plain step does, and is refused
where it does not fit; loading the C kernels leaves the process's floating-point mode alone."""

import copy
import os
import shutil
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from builders import randomize

from diffusion import create_diffusion
from ditnorm.trainer import diffusion_loss, fast_loss, optimizer_step
from fast import fused_dit, kernels, train_step
from models import NORM_KINDS, build_model

LIB = fused_dit.load_c_kernels()
needs_c = pytest.mark.skipif(LIB is None, reason="needs the C kernels (a C compiler)")
pytestmark = pytest.mark.usefixtures("one_thread")
# The kernels as built for this CPU and, on an AVX-512 CPU, also for AVX2 (8-float blocking), so that
# every machine that runs the tests checks both micro-kernels it can run.
WIDER = kernels.vector_floats("native") == 16
ISAS = ["native"] + (["avx2"] if WIDER and kernels.isa_runs_here("avx2") else [])


@pytest.fixture(params=ISAS)
def lib(request):
    """The C kernels built for one instruction set (skips where they do not build)."""
    built = fused_dit.load_c_kernels(request.param)
    if built is None:
        pytest.skip(f"no C kernels for {request.param} here")
    return built


def trainer_step(loss_fn, model, optimizer, ema_decay, world_size, ema):
    """step(x_start, t, noise, y) -> the loss: the trainer's step (its loss, then trainer.optimizer_step)."""
    ema = copy.deepcopy(model).requires_grad_(False) if ema is None else ema

    def step(*batch):
        loss = loss_fn(*batch)
        optimizer_step(loss, model, ema, optimizer, ema_decay, world_size)
        return loss.detach()
    return step


def fast_step(model, optimizer, diffusion=None, ema_decay=0.9, world_size=1, ema=None):
    """The trainer's step around fast.proven_loss's loss for model (it must prove itself)."""
    loss, reason = train_step.proven_loss(model, diffusion or create_diffusion(""))
    assert reason is None and loss is not None
    return trainer_step(loss, model, optimizer, ema_decay, world_size, ema)


def plain_step(model, optimizer, diffusion=None, ema_decay=0.9, world_size=1, ema=None):
    """The trainer's plain step for model."""
    diffusion = diffusion or create_diffusion("")
    return trainer_step(lambda *batch: diffusion_loss(model, diffusion, *batch), model, optimizer, ema_decay,
                        world_size, ema)


def toy_batch(n, seed=0):
    """x_start, t (including t = 0, the decoder-NLL branch), noise, y for a 2x2x2 toy."""
    g = torch.Generator().manual_seed(seed)
    x_start = torch.randn(n, 2, 2, 2, generator=g) * 0.5
    t = torch.randint(0, 1000, (n,), generator=g)
    t[:2] = 0
    return x_start, t, torch.randn(n, 2, 2, 2, generator=g), torch.zeros(n, dtype=torch.long)


def perturbed(model, scale=0.05, seed=1):
    """Move every weight (the adaLN-Zero zeros and dyt alphas included) off its initial value."""
    return randomize(model, seed, std=scale, add=True)


def loss_and_grads(model, model_fn, diffusion, batch):
    """Mean hybrid loss and every parameter gradient with model_fn standing in for model."""
    model.zero_grad(set_to_none=True)
    x_start, t, noise, y = batch
    loss = diffusion.training_losses(model_fn, x_start, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want, rtol=1e-4):
    """Each gradient within rtol of the largest entry of that tensor's reference gradient (floored)."""
    assert got.keys() == want.keys()
    # A dyt alpha gradient is one sum over every activation whose terms cancel; after AdamW has turned
    # round-off into real steps, it can land near 1e-5 while its float error stays ~1e-10. The floor
    # (1e-3 of the model's largest gradient entry) keeps that from failing one run in a few.
    floor = 1e-3 * max(g.abs().max() for g in want.values())
    for name in want:
        scale = want[name].abs().max().clamp_min(floor).clamp_min(1e-8)
        err = (got[name] - want[name]).abs().max() / scale
        assert err < rtol, f"{name}: relative error {err:.2e}"


def float64_loss_and_grads(model, batch, diffusion=None):
    """loss_and_grads of a float64 copy of model on the batch in float64 (default diffusion: DiT's): the
    reference that both float32 implementations (plain PyTorch and the C kernels) are measured against."""
    double = copy.deepcopy(model).double()
    sinusoid = double.t_embedder.timestep_embedding  # float32 by design (as DiT's); cast for this reference
    double.t_embedder.timestep_embedding = lambda t, dim: sinusoid(t, dim).double()
    batch = tuple(x.double() if x.is_floating_point() else x for x in batch)
    return loss_and_grads(double, double, diffusion or create_diffusion(timestep_respacing=""), batch)


# Two correct float32 implementations sum in different orders; each lands within a few times the other's
# distance from the exact (float64) result. A wrong formula, or one that loses precision, lands orders of
# magnitude off (issue 35: AVX2's approximate reciprocal in the GELU derivative, 17x plain's error).
FLOAT32_SPREAD = 4
# Below 16 float32 ulps the yardstick is rounding luck: a scalar gradient (a dyt alpha) is one sum of ~10^4
# terms that cancel, and either implementation's single draw of its error can land near 0.
FLOOR = 16 * torch.finfo(torch.float32).eps


def plain_float32(model, diffusion, batch):
    """The plain model's (loss, grads) on the batch in its order and reversed: two float32 evaluations that
    differ only in the order of their sums, so that their errors sample what float32 rounding gives."""
    return [loss_and_grads(model, model, diffusion, b) for b in (batch, tuple(x.flip(0) for x in batch))]


def assert_as_exact_as_float32(got, plains, exact):
    """got's (loss, grads) no further from exact's than FLOAT32_SPREAD times the plain float32 evaluations'
    (the larger of plains'): for the loss, and for each gradient tensor (relative L2 error) against the
    larger of plain's error on that tensor and on all gradients together (a tensor where plain float32
    happens to be near-exact is not the yardstick), never below FLOOR."""
    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()

    loss_err = rel(got[0], exact[0])
    loss_plain = max(rel(plain[0], exact[0]) for plain in plains)
    assert loss_err <= FLOAT32_SPREAD * max(loss_plain, FLOOR), f"loss {loss_err:.2e}, plain {loss_plain:.2e}"
    assert got[1].keys() == exact[1].keys()
    names = list(exact[1])
    overall = max(rel(*[torch.cat([grads[n].flatten() for n in names]) for grads in (plain[1], exact[1])])
                  for plain in plains)
    for n in names:
        err, mine = rel(got[1][n], exact[1][n]), max(rel(plain[1][n], exact[1][n]) for plain in plains)
        assert err <= FLOAT32_SPREAD * max(mine, overall, FLOOR), (
            f"{n}: relative error {err:.2e}, plain float32's {mine:.2e} (all gradients {overall:.2e})")


@needs_c
@pytest.mark.parametrize("norm", NORM_KINDS)
def test_fused_model_matches_plain_model(lib, norm):
    diffusion = create_diffusion("")
    model = build_model("ToyDiT/1", norm=norm)
    kern = fused_dit.TiledKernels(lib, rows=20)  # tiles of 5 samples: a batch of 48 has 10, the last short
    batch = toy_batch(48)
    # Fresh (adaLN-Zero: many gradients are exactly zero), then perturbed, then after a few real steps.
    states = [copy.deepcopy(model.state_dict())]
    perturbed(model)
    states.append(copy.deepcopy(model.state_dict()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0)
    plain = plain_step(model, opt, diffusion, ema_decay=0.99)
    for seed in range(3):
        plain(*toy_batch(48, seed=10 + seed))
    states.append(copy.deepcopy(model.state_dict()))
    for state in states:
        model.load_state_dict(state)
        plain = plain_float32(model, diffusion, batch)
        got = loss_and_grads(model, fused_dit.fused_model(model, kern=kern), diffusion, batch)
        assert torch.isfinite(plain[0][0])
        assert_as_exact_as_float32(got, plain, float64_loss_and_grads(model, batch))


@needs_c
def test_the_network_stays_finite_and_exact_far_in_the_tails(lib):
    # Norm-free models blow activations up; GELU's exp overflows and attention scores get huge there. Large
    # MLP and attention weights put GELU inputs beyond +-60 (the C code caps exp's argument at 80) and
    # attention scores near a thousand. There float32 itself is ~2e-5 off in the gradients (a softmax of
    # scores 1e3 apart), so the C path is held to plain float32's distance from a float64 evaluation; an
    # overflow or a missing cap gives NaN or errors of order 1, and a derivative that loses precision
    # (issue 35) 10-300x plain's error.
    diffusion = create_diffusion("")
    torch.manual_seed(0)
    model = perturbed(build_model("ToyDiT-XS/1", norm="none"))
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.weight.mul_(20)
            block.attn.qkv.weight.mul_(20)
    seen = {}
    hooks = [model.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, out: seen.update(fc1=out.detach())),
             model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, out: seen.update(qkv=out.detach()))]
    batch = toy_batch(32, seed=7)
    plain = plain_float32(model, diffusion, batch)
    for hook in hooks:
        hook.remove()
    q, k, _ = seen["qkv"].view(32, 4, 3, 2, 16).unbind(2)  # each (N, T, H, d)
    scores = torch.einsum("nihe,njhe->nhij", q, k) / 4
    assert seen["fc1"].abs().max() > 60 and scores.abs().max() > 500  # the tails are reached
    kern = fused_dit.TiledKernels(lib, rows=20)
    exact = float64_loss_and_grads(model, batch)
    for got in (loss_and_grads(model, fused_dit.fused_model(model, kern=kern), diffusion, batch),
                fused_loss_and_grads(model, diffusion, batch, kern)):
        assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1].values())
        assert_as_exact_as_float32(got, plain, exact)


@needs_c
@pytest.mark.parametrize("path", ["fused_model", "fused_hybrid_loss"])
def test_tiled_path_with_two_threads_matches_one_thread(lib, path):
    # Two threads split the tiles and sum their weight gradients in thread order; a 2-sample batch leaves
    # each thread one tile of one sample, a 1-sample batch one thread idle (and its patches a strided view).
    diffusion = create_diffusion("")
    model = perturbed(build_model("ToyDiT/1", norm="layernorm" if path == "fused_model" else "dyt"))
    kern = fused_dit.TiledKernels(lib, rows=24)

    def run(batch):
        if path == "fused_model":
            return loss_and_grads(model, fused_dit.fused_model(model, kern=kern), diffusion, batch)
        return fused_loss_and_grads(model, diffusion, batch, kern)

    for n in (50, 2, 1):
        batch = toy_batch(n, seed=n)
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(batch))
        torch.set_num_threads(1)
        (loss1, grads1), (loss2, grads2) = results
        assert torch.allclose(loss1, loss2, rtol=1e-6, atol=0)
        assert_grads_close(grads2, grads1, rtol=1e-5)
        want_loss, want = loss_and_grads(model, model, diffusion, batch)
        assert torch.allclose(loss2, want_loss, rtol=1e-5, atol=0)
        assert_grads_close(grads2, want)


@needs_c
@pytest.mark.parametrize("name, overrides", [
    ("ToyDiT-XS/1", {}),  # hidden 32: the micro-kernel's 16-column path
    ("ToyDiT/1", {"hidden_size": 40, "num_heads": 2}),  # 40 columns: the scalar remainder path
    ("DiT-S/4", {"input_size": 8, "depth": 2, "num_classes": 3}),  # patch 4, 4 channels, hidden 384
])
def test_tiled_path_shapes_other_than_the_toys(lib, name, overrides):
    # The toy's own shapes run as compile-time constants; every other model takes the general code.
    diffusion = create_diffusion("")
    model = perturbed(build_model(name, **overrides))
    kern = fused_dit.TiledKernels(lib, rows=12)
    _, t, _, y = toy_batch(7, seed=5)
    cfg = model.config
    g = torch.Generator().manual_seed(6)
    shape = (7, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    batch = (torch.randn(shape, generator=g), t, torch.randn(shape, generator=g), y % cfg["num_classes"])
    torch.manual_seed(0)  # the same label dropout (drawn from the global generator) in every run
    want_loss, want = loss_and_grads(model, model, diffusion, batch)
    for run in (lambda: loss_and_grads(model, fused_dit.fused_model(model, kern=kern), diffusion, batch),
                lambda: fused_loss_and_grads(model, diffusion, batch, kern)):  # also the loss's patch layout
        torch.manual_seed(0)
        got_loss, got = run()
        assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0)
        assert_grads_close(got, want)


def fused_loss_and_grads(model, diffusion, batch, kern):
    """loss_and_grads through fused_dit.fused_hybrid_loss (forward, loss and backward in one C call)."""
    model.zero_grad(set_to_none=True)
    loss = fused_dit.fused_hybrid_loss(model, diffusion, kern=kern)(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_c
@pytest.mark.parametrize("diffusion_args", [{}, {"timestep_respacing": "250", "rescale_learned_sigmas": True,
                                                 "diffusion_steps": 500}], ids=["dit", "respaced-rescaled"])
@pytest.mark.parametrize("norm", NORM_KINDS)
def test_fused_hybrid_loss_matches_training_losses(lib, norm, diffusion_args):
    diffusion = create_diffusion(**{"timestep_respacing": "", **diffusion_args})
    model = perturbed(build_model("ToyDiT/1", norm=norm))
    x_start, t, noise, y = toy_batch(48, seed=3)
    t = t % diffusion.num_timesteps
    t[:3] = 0  # the decoder-NLL rows, with pixels at and beyond the edges
    x_start[0, 0, 0] = torch.tensor([-1.0, 1.0])
    x_start[1] = 0.9995
    x_start[2], noise[2] = -1.0, 3.0  # x_t = x_0 + 0.01 noise at t = 0: the edge bin ~3 std from the mean
    batch = (x_start, t, noise, y)
    kern = fused_dit.TiledKernels(lib, rows=20)  # tiles of 5 samples, the last one short
    # the whole batch, no t = 0 row at all, and a batch of only t = 0 rows
    for rows in (t == t, t != 0, t == 0):
        sub = tuple(x[rows] for x in batch)
        plain = plain_float32(model, diffusion, sub)
        assert torch.isfinite(plain[0][0])
        exact = float64_loss_and_grads(model, sub, diffusion)
        assert_as_exact_as_float32(fused_loss_and_grads(model, diffusion, sub, kern), plain, exact)


@needs_c
@pytest.mark.parametrize("norm", ["layernorm", "none"])
def test_fused_decoder_nll_far_tails_match_a_float64_reference(lib, norm):
    # Noise 50 at t = 0 puts the decoder's mean ~0.5 from x_0: the edge bins lie ~50 std out (the log-CDF's
    # asymptotic series in C) and a middle bin's probability falls below the 1e-12 clamp. There the float32
    # PyTorch loss's gradient is off by ~1e-4 (its tail derivatives round), so the reference is float64.
    diffusion = create_diffusion(timestep_respacing="")
    model = perturbed(build_model("ToyDiT/1", norm=norm))
    x_start, t, noise, y = toy_batch(8, seed=4)
    t[:2] = 0
    x_start[0, 0] = torch.tensor([[-1.0, 1.0], [0.0, 0.5]])
    noise[0, 0] = torch.tensor([[50.0, -50.0], [50.0, -50.0]])
    x_start[1], noise[1] = 1.0, -40.0
    want_loss, want = float64_loss_and_grads(model, (x_start, t, noise, y))
    got_loss, got = fused_loss_and_grads(model, diffusion, (x_start, t, noise, y),
                                         fused_dit.TiledKernels(lib, rows=8))
    assert torch.isfinite(want_loss)
    assert abs(got_loss.double() - want_loss) < 1e-5 * want_loss
    assert_grads_close({n: g.double() for n, g in got.items()}, want, rtol=1e-5)


@needs_c
def test_fused_decoder_nll_clamped_bins_send_no_gradient():
    # Middle bins whose probability is below the 1e-12 clamp give the decoder NLL a constant, so the
    # variance outputs get no gradient at all: the final layer's variance rows must stay exactly 0 (a
    # relative comparison would not see a small wrong gradient here, next to the MSE's large one).
    diffusion = create_diffusion(timestep_respacing="")
    model = perturbed(build_model("ToyDiT/1"))
    x_start, t, noise, y = toy_batch(6, seed=5)
    t[:], x_start[:] = 0, 0.0
    signs = torch.rand(noise.shape, generator=torch.Generator().manual_seed(6)) < 0.5
    noise[:] = torch.where(signs, 50.0, -50.0)  # the mean 0.5 (~50 std) from x_0 = 0, either side
    want_loss, want = loss_and_grads(model, model, diffusion, (x_start, t, noise, y))
    got_loss, got = fused_loss_and_grads(model, diffusion, (x_start, t, noise, y),
                                         fused_dit.TiledKernels(LIB, rows=8))
    C = x_start.shape[1]  # the linear's outputs per patch: C eps channels, then C variance channels
    for grads in (want, got):
        assert grads["final_layer.linear.weight"][:C].abs().max() > 0
        assert torch.all(grads["final_layer.linear.weight"][C:] == 0)
        assert torch.all(grads["final_layer.linear.bias"][C:] == 0)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0)


@needs_c
def test_fused_hybrid_loss_scales_its_gradients_by_the_incoming_one():
    # The forward computes the gradients of the mean loss; a caller may weight the loss.
    diffusion = create_diffusion("")
    model = perturbed(build_model("ToyDiT-XS/1"))
    kern = fused_dit.TiledKernels(LIB)
    batch = toy_batch(10)
    loss, grads = fused_loss_and_grads(model, diffusion, batch, kern)
    model.zero_grad(set_to_none=True)
    (-2.5 * fused_dit.fused_hybrid_loss(model, diffusion, kern=kern)(*batch)).backward()
    scaled = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_grads_close(scaled, {n: -2.5 * g for n, g in grads.items()}, rtol=1e-5)


def test_other_losses_keep_training_losses():
    kl = create_diffusion("", use_kl=True)
    assert "hybrid loss" in fused_dit.hybrid_loss_supported(kl)
    assert fused_dit.hybrid_loss_supported(create_diffusion("")) is None
    model = perturbed(build_model("ToyDiT-XS/1"))
    if LIB is not None:
        with pytest.raises(ValueError, match="hybrid loss"):
            fused_dit.fused_hybrid_loss(model, kl, kern=fused_dit.TiledKernels(LIB))
    if LIB is None:
        return
    # the proven step runs the fused model under training_losses: the plain step's update
    batch = toy_batch(16)
    models = [copy.deepcopy(model) for _ in range(2)]
    for m, make in zip(models, (fast_step, plain_step), strict=True):
        make(m, torch.optim.SGD(m.parameters(), lr=0.01), kl)(*batch)
    for a, b, old in zip(*[m.parameters() for m in models], model.parameters(), strict=True):
        torch.testing.assert_close(a - old, b - old, rtol=1e-3, atol=1e-6)  # the updates (vb x T: large)


def test_loading_the_c_kernels_keeps_denormals():
    # A -ffast-math library linked by gcc 12 carries crtfastmath.o, whose constructor turns on
    # flush-to-zero for the process that loads it: every float op of the user's program would change.
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: the C kernels cannot be loaded")
    lib = fused_dit.load_c_kernels()  # loads it into this process (or returns the one loaded here before)
    assert lib is not None, "the C kernels did not build or load (see the warning)"
    lib.set_num_threads(torch.get_num_threads())  # a real call into the loaded library
    tiny = torch.tensor([1e-39])  # below float32's smallest normal number
    # (pytest.approx would not do: its absolute tolerance, 1e-12, accepts 0.)
    assert torch.equal(tiny * 1.0, tiny), "denormals are flushed to zero after loading the C kernels"
    assert (tiny / 2).item() > 0


@needs_c
def test_the_toy_takes_the_fast_step():
    model = build_model("ToyDiT/1")
    optimizer = torch.optim.AdamW(model.parameters())
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    loss, reason = fast_loss("auto", model, create_diffusion(""), class_dropout=False)
    assert (loss.path, reason) == ("tiled-cpu", None)
    # The caller's optimizer is left as the caller made it (no switch to fused=True behind its back).
    assert {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} == settings


def test_configs_outside_the_fast_path_get_no_step_and_the_reason():
    model = build_model("DiT-S/8", input_size=64, num_classes=10)  # 64 tokens: fast
    assert fused_dit.DiTPlan(model).reason is None
    model = build_model("DiT-S/2", input_size=32, num_classes=10)  # 256 tokens: plain
    loss, reason = train_step.proven_loss(model, create_diffusion(""))
    assert loss is None and reason == "256 tokens (the fused path handles up to 64)"


def test_without_a_c_compiler_there_is_no_fast_step(monkeypatch):
    # A machine without a C compiler trains and samples with the plain code; nothing else runs there.
    monkeypatch.setattr(train_step, "c_kernels", lambda: None)
    model = build_model("ToyDiT-XS/1")
    loss, reason = train_step.proven_loss(model, create_diffusion(""))
    assert loss is None and reason == "the C kernels did not build or load here (the warning says why)"


@needs_c
def test_step_updates_parameters_and_ema_like_the_plain_step():
    diffusion = create_diffusion("")
    results = []
    for make in (fast_step, plain_step):
        torch.manual_seed(0)
        model = perturbed(build_model("ToyDiT/1", norm="dyt"))
        ema = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():  # an EMA that differs from the model, so the update is visible
            for p in ema.parameters():
                p.mul_(0.5)
        ema_before = [p.clone() for p in ema.parameters()]
        # SGD: the update is linear in the gradient, so both paths must land on the same parameters.
        step = make(model, torch.optim.SGD(model.parameters(), lr=0.1), diffusion, ema=ema)
        loss = step(*toy_batch(64))
        assert loss.ndim == 0 and not loss.requires_grad
        for p_ema, p_old, p in zip(ema.parameters(), ema_before, model.parameters(), strict=True):
            torch.testing.assert_close(p_ema, 0.9 * p_old + 0.1 * p, rtol=1e-6, atol=1e-7)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss_fast, params_fast), (loss_plain, params_plain) = results
    assert torch.allclose(loss_fast, loss_plain, rtol=1e-5, atol=0)
    for a, b in zip(params_fast, params_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _rank_main(rank, init_file, out_dir):
    """One of two gloo ranks: a world_size=2 step on half of the batch, then save the parameters."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = perturbed(build_model("ToyDiT-XS/1"))
    step = fast_step(model, torch.optim.SGD(model.parameters(), lr=1.0), world_size=2)
    batch = [x[rank * 8:(rank + 1) * 8] for x in toy_batch(16)]
    step(*batch)
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@needs_c
def test_two_ranks_average_gradients_like_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    model = perturbed(build_model("ToyDiT-XS/1"))
    before = [p.detach().clone() for p in model.parameters()]
    # SGD with lr 1: new = old - grad, so equal parameters mean equal averaged gradients.
    fast_step(model, torch.optim.SGD(model.parameters(), lr=1.0))(*toy_batch(16))
    for a, b, c, old in zip(ranks[0], ranks[1], model.parameters(), before, strict=True):
        assert torch.equal(a, b)  # every rank applies the same averaged gradient
        torch.testing.assert_close(old - a, old - c.detach(), rtol=1e-5, atol=1e-7)
