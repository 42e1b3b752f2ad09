"""fast/train_step.py and fast/fused_dit.py: the hand-written DiT gives the plain model's loss and gradients;
EMA; all-reduce; loading the C kernels leaves the process's floating-point mode alone."""

import copy
import functools
import os
import shutil
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from builders import randomize

from diffusion import create_diffusion
from fast import fused_dit, train_step
from models import NORM_KINDS, build_model

KERNELS = [pytest.param(fused_dit.TorchKernels(), id="torch")]
LIB = fused_dit.load_c_kernels()
if LIB is not None:
    KERNELS.insert(0, pytest.param(fused_dit.CKernels(LIB), id="c"))
    # 20 rows: tiles of 5 toy samples, so a batch of 48 has 10 tiles, the last one short
    KERNELS.insert(0, pytest.param(fused_dit.TiledKernels(LIB, rows=20), id="tiled"))


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("norm", NORM_KINDS)
def test_fused_model_matches_plain_model(norm, kern):
    diffusion = create_diffusion("")
    model = build_model("ToyDiT/1", norm=norm)
    batch = toy_batch(48)
    # Fresh (adaLN-Zero: many gradients are exactly zero), then perturbed, then after a few real steps.
    states = [copy.deepcopy(model.state_dict())]
    perturbed(model)
    states.append(copy.deepcopy(model.state_dict()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0)
    plain = train_step.make_train_step(model, copy.deepcopy(model).requires_grad_(False), diffusion, opt,
                                       ema_decay=0.99, fast="off")
    for seed in range(3):
        plain(*toy_batch(48, seed=10 + seed))
    states.append(copy.deepcopy(model.state_dict()))
    for state in states:
        model.load_state_dict(state)
        want_loss, want = loss_and_grads(model, model, diffusion, batch)
        got_loss, got = loss_and_grads(model, fused_dit.fused_model(model, kern=kern), diffusion, batch)
        assert torch.isfinite(want_loss)
        assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0)
        assert_grads_close(got, want)


@pytest.mark.parametrize("kern", KERNELS)
def test_kernels_stay_finite_and_exact_far_in_the_tails(kern):
    # Norm-free models blow activations up; GELU's exp overflows and attention scores get huge there.
    x = torch.linspace(-80, 80, 4 * 256).view(4, 256)
    zero, grad = torch.zeros(256), torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(kern.gelu_fwd(x.clone(), zero), want, rtol=1e-5, atol=1e-6)
    dx, db = kern.gelu_bwd(grad, x)
    want = torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    # Near x = -5 PyTorch's tanh rounds to -1 and its GELU slope to 0 while the true slope is still ~1e-6
    # (the kernels' sigmoid form keeps it): an absolute difference of up to ~1e-6 times |grad|.
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=4e-6)
    torch.testing.assert_close(db, dx.sum(0), rtol=1e-5, atol=1e-5)
    N, T, H, hd = 3, 4, 2, 8
    # Scores in the thousands. A fixed draw: with random ones, ~3% put two scores of a row within float32
    # round-off of each other, where any two correct softmaxes disagree by more than the tolerance.
    qkv = torch.randn(N * T, 3 * H * hd, generator=torch.Generator().manual_seed(0)) * 30
    out, probs = kern.attn_fwd(qkv.clone(), torch.zeros(3 * H * hd), N, T, H, hd)
    q, k, v = qkv.view(N, T, 3, H, hd).permute(2, 0, 3, 1, 4)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N * T, H * hd)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(probs).all()


@pytest.mark.skipif(LIB is None, reason="needs the C kernels")
@pytest.mark.parametrize("path", ["fused_model", "fused_hybrid_loss"])
def test_tiled_path_with_two_threads_matches_one_thread(path):
    # Two threads split the tiles and sum their weight gradients in thread order; a 2-sample batch leaves
    # each thread one tile of one sample, a 1-sample batch one thread idle (and its patches a strided view).
    diffusion = create_diffusion("")
    model = perturbed(build_model("ToyDiT/1", norm="layernorm" if path == "fused_model" else "dyt"))
    kern = fused_dit.TiledKernels(LIB, rows=24)

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


@pytest.mark.skipif(LIB is None, reason="needs the C kernels")
@pytest.mark.parametrize("name, overrides", [
    ("ToyDiT-XS/1", {}),  # hidden 32: the micro-kernel's 16-column path
    ("ToyDiT/1", {"hidden_size": 40, "num_heads": 2}),  # 40 columns: the scalar remainder path
    ("DiT-S/4", {"input_size": 8, "depth": 2, "num_classes": 3}),  # patch 4, 4 channels, hidden 384
])
def test_tiled_path_shapes_other_than_the_toys(name, overrides):
    # The toy's own shapes run as compile-time constants; every other model takes the general code.
    diffusion = create_diffusion("")
    model = perturbed(build_model(name, **overrides))
    kern = fused_dit.TiledKernels(LIB, rows=12)
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


@pytest.mark.skipif(LIB is None, reason="needs the C kernels")
@pytest.mark.parametrize("diffusion_args", [{}, {"timestep_respacing": "250", "rescale_learned_sigmas": True,
                                                 "diffusion_steps": 500}], ids=["dit", "respaced-rescaled"])
@pytest.mark.parametrize("norm", NORM_KINDS)
def test_fused_hybrid_loss_matches_training_losses(norm, diffusion_args):
    diffusion = create_diffusion(**{"timestep_respacing": "", **diffusion_args})
    model = perturbed(build_model("ToyDiT/1", norm=norm))
    x_start, t, noise, y = toy_batch(48, seed=3)
    t = t % diffusion.num_timesteps
    t[:3] = 0  # the decoder-NLL rows, with pixels at and beyond the edges
    x_start[0, 0, 0] = torch.tensor([-1.0, 1.0])
    x_start[1] = 0.9995
    x_start[2], noise[2] = -1.0, 3.0  # x_t = x_0 + 0.01 noise at t = 0: the edge bin ~3 std from the mean
    batch = (x_start, t, noise, y)
    kern = fused_dit.TiledKernels(LIB, rows=20)  # tiles of 5 samples, the last one short
    want_loss, want = loss_and_grads(model, model, diffusion, batch)
    got_loss, got = fused_loss_and_grads(model, diffusion, batch, kern)
    assert torch.isfinite(want_loss)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0)
    assert_grads_close(got, want)
    # no t = 0 row at all, and a batch of only t = 0 rows
    for rows in (t != 0, t == 0):
        sub = tuple(x[rows] for x in batch)
        want_loss, want = loss_and_grads(model, model, diffusion, sub)
        got_loss, got = fused_loss_and_grads(model, diffusion, sub, kern)
        assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0)
        assert_grads_close(got, want)


@pytest.mark.skipif(LIB is None, reason="needs the C kernels")
@pytest.mark.parametrize("norm", ["layernorm", "none"])
def test_fused_decoder_nll_far_tails_match_a_float64_reference(norm):
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
    double = copy.deepcopy(model).double()
    sinusoid = double.t_embedder.timestep_embedding  # float32 by design (as DiT's); cast for this reference
    double.t_embedder.timestep_embedding = lambda t, dim: sinusoid(t, dim).double()
    want_loss, want = loss_and_grads(double, double, create_diffusion(timestep_respacing=""),
                                     tuple(x.double() if x.is_floating_point() else x for x in
                                           (x_start, t, noise, y)))
    got_loss, got = fused_loss_and_grads(model, diffusion, (x_start, t, noise, y),
                                         fused_dit.TiledKernels(LIB, rows=8))
    assert torch.isfinite(want_loss)
    assert abs(got_loss.double() - want_loss) < 1e-5 * want_loss
    assert_grads_close({n: g.double() for n, g in got.items()}, want, rtol=1e-5)


@pytest.mark.skipif(LIB is None, reason="needs the C kernels")
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


@pytest.mark.skipif(LIB is None, reason="needs the C kernels")
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
    # make_train_step falls back to the fused model under training_losses: the plain step's update
    batch = toy_batch(16)
    models = [copy.deepcopy(model) for _ in range(2)]
    makes = (train_step.make_train_step, functools.partial(train_step.make_train_step, fast="off"))
    for m, make in zip(models, makes, strict=True):
        step = make(m, copy.deepcopy(m).requires_grad_(False), kl, torch.optim.SGD(m.parameters(), lr=0.01),
                    ema_decay=0.9)
        step(*batch)
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


def test_default_step_takes_the_fast_path_for_the_toy():
    model = build_model("ToyDiT/1")
    optimizer = torch.optim.AdamW(model.parameters())
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    step = train_step.make_train_step(model, copy.deepcopy(model), create_diffusion(""), optimizer,
                                      ema_decay=0.9)
    expected = "torch-cpu" if LIB is None else "tiled-cpu"
    assert step.path == expected
    # The caller's optimizer is left as the caller made it (no switch to fused=True behind its back).
    assert {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} == settings


def test_configs_outside_the_fast_path_fall_back_to_plain():
    model = build_model("DiT-S/8", input_size=64, num_classes=10)  # 64 tokens: fast
    assert fused_dit.DiTPlan(model).reason is None
    model = build_model("DiT-S/2", input_size=32, num_classes=10)  # 256 tokens: plain
    step = train_step.make_train_step(model, copy.deepcopy(model), create_diffusion(""),
                                      torch.optim.AdamW(model.parameters()), ema_decay=0.9)
    assert step.path == "plain"


def test_step_updates_parameters_and_ema_like_the_plain_step():
    diffusion = create_diffusion("")
    results = []
    for make in (train_step.make_train_step, functools.partial(train_step.make_train_step, fast="off")):
        torch.manual_seed(0)
        model = perturbed(build_model("ToyDiT/1", norm="dyt"))
        ema = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():  # an EMA that differs from the model, so the update is visible
            for p in ema.parameters():
                p.mul_(0.5)
        ema_before = [p.clone() for p in ema.parameters()]
        # SGD: the update is linear in the gradient, so both paths must land on the same parameters.
        step = make(model, ema, diffusion, torch.optim.SGD(model.parameters(), lr=0.1), ema_decay=0.9)
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
    step = train_step.make_train_step(model, copy.deepcopy(model).requires_grad_(False), create_diffusion(""),
                                      torch.optim.SGD(model.parameters(), lr=1.0), ema_decay=0.9,
                                      world_size=2)
    batch = [x[rank * 8:(rank + 1) * 8] for x in toy_batch(16)]
    step(*batch)
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_ranks_average_gradients_like_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    model = perturbed(build_model("ToyDiT-XS/1"))
    before = [p.detach().clone() for p in model.parameters()]
    # SGD with lr 1: new = old - grad, so equal parameters mean equal averaged gradients.
    step = train_step.make_train_step(model, copy.deepcopy(model).requires_grad_(False), create_diffusion(""),
                                      torch.optim.SGD(model.parameters(), lr=1.0), ema_decay=0.9)
    step(*toy_batch(16))
    for a, b, c, old in zip(ranks[0], ranks[1], model.parameters(), before, strict=True):
        assert torch.equal(a, b)  # every rank applies the same averaged gradient
        torch.testing.assert_close(old - a, old - c.detach(), rtol=1e-5, atol=1e-7)


def test_loss_traces_to_one_graph():
    """The CUDA path torch.compiles forward + hybrid loss with fullgraph=True: a graph break (e.g. a host
    sync creeping into the model or the loss) must fail here, on the CPU, not on a GPU machine. aot_eager
    traces forward and backward as the CUDA path does, without generating kernels."""
    torch.manual_seed(0)
    model = perturbed(build_model("ToyDiT-XS/1"))
    loss_fn = train_step._loss_fn(create_diffusion(""), model)
    batch = toy_batch(32)  # t = 0 rows included: the decoder-NLL branch
    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True, dynamic=False)):
        model.zero_grad(set_to_none=True)
        loss = fn(*batch)
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    torch._dynamo.reset()
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_compile_options_of_a_setting():
    assert train_step.compile_options(None) == train_step.compile_options("default") == {}
    assert train_step.compile_options("max-autotune-no-cudagraphs+combo_kernels") == {
        "max_autotune": True, "coordinate_descent_tuning": True, "combo_kernels": True}
    for refused in ("reduce-overhead", "max-autotune", "default+triton.cudagraphs", "fast",
                    "default+max_autotune_gemm_backends"):
        with pytest.raises(ValueError):  # inductor's own CUDA graphs; no such mode; not a boolean flag
            train_step.compile_options(refused)


def test_compiled_loss_compiles_once():
    """Every compilation of the GPU step's loss costs ~20 s there; a guard that changes between calls (e.g.
    a cache filled during the first) compiles it again."""
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    torch._dynamo.reset()
    model = perturbed(build_model("ToyDiT-XS/1"))
    loss_fn = train_step._compiled_loss_fn(create_diffusion(""), model, backend=counting_backend)
    for seed in range(3):
        loss_fn(*toy_batch(32, seed=seed)).backward()
    torch._dynamo.reset()
    assert len(compiles) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("compile_cuda", [False, True], ids=["plain", "compiled"])
def test_cuda_graph_step_matches_cpu_step(compile_cuda, optimizer):
    """6 steps (3 eager warm-up, the capture, 2 replays) on CUDA and on the CPU from the same weights.

    With SGD the parameters are old - lr * (sum of the gradients), so they compare the gradients. AdamW
    (switched to its capturable fused kernel on CUDA) divides each gradient by its own running size: an
    element whose gradient is near 0 moves by up to ~lr per step with a sign set by round-off, so only that
    bound can be asserted on its parameters; its losses must still agree at every step."""
    lr = 0.01 if optimizer == "sgd" else 1e-3
    diffusion = create_diffusion("")
    torch.manual_seed(0)
    cpu_model = perturbed(build_model("ToyDiT/1"))
    gpu_model = copy.deepcopy(cpu_model).cuda()
    before = [p.detach().clone() for p in cpu_model.parameters()]
    steps = []
    for model in (cpu_model, gpu_model):
        opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else
               torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0))
        steps.append(train_step.make_train_step(model, copy.deepcopy(model).requires_grad_(False), diffusion,
                                                opt, ema_decay=0.99, compile_cuda=compile_cuda))
    assert steps[1].path == ("cuda-graph-compiled" if compile_cuda else "cuda-graph")
    for seed in range(6):
        batch = toy_batch(256, seed=seed)
        loss_cpu = steps[0](*batch)
        loss_gpu = steps[1](*[x.cuda() for x in batch])
        torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-4, atol=1e-6)
    for a, b, old in zip(cpu_model.parameters(), gpu_model.parameters(), before, strict=True):
        if optimizer == "sgd":
            torch.testing.assert_close(b.detach().cpu() - old, a.detach() - old, rtol=1e-3, atol=1e-6)
        else:
            assert (b.detach().cpu() - a.detach()).abs().max() <= 2 * 6 * lr
    # the optimizer ran on the GPU and moved the same parameters as on the CPU
    moved = [[not torch.equal(p.detach().cpu(), old) for p, old in zip(m.parameters(), before, strict=True)]
             for m in (cpu_model, gpu_model)]
    assert moved[0] == moved[1] and any(moved[0])
