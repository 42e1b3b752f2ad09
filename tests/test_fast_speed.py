"""fast/speed.py: a fast path that computes the right thing runs only where it is also clearly faster than
the plain code, on the model, batch and thread count used; the times and the choice reach the log and
config.json; a timing is cached per CPU build, model, batch and threads, and re-timed when one changes."""

import json
from types import SimpleNamespace

import pytest
import torch
from builders import randomize

from diffusion import create_diffusion
from ditnorm.trainer import fast_loss, train_run
from fast import fused_dit, sample_toy, speed
from fast import sampler as fast_sampler
from models import build_model

needs_c = pytest.mark.skipif(fused_dit.load_c_kernels() is None, reason="needs the C kernels (a C compiler)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test times into its own empty cache (the built kernels stay where they are)."""
    monkeypatch.setattr(speed, "cache_dir", lambda: tmp_path / "cache")


class FakeTimes:
    """speed.measure's stand-in: fixed (fast, plain) seconds, and the number of times it was asked."""

    def __init__(self, fast_s, plain_s):
        self.times, self.calls = (fast_s, plain_s), 0

    def __call__(self, fast_run, plain_run):
        fast_run(), plain_run()  # what is timed must run
        self.calls += 1
        return self.times


def toy_step(batch_size, norm="layernorm", model=None):
    """The trainer's choice of step for a toy with --fast auto, for a local batch of batch_size: its path,
    why not fast and the timing, as config.json records them."""
    model = model or build_model("ToyDiT-XS/1", norm=norm)
    loss, reason = fast_loss("auto", model, create_diffusion(""), False, batch_size)
    return SimpleNamespace(path=getattr(loss, "path", "plain"), fast_reason=reason,
                           fast_timing=getattr(loss, "timing", None))


def test_measure_alternates_after_a_warm_up_and_takes_medians():
    now, order = [0.0], []

    def run(name, seconds):
        def call():
            order.append(name)
            now[0] += seconds.pop(0)
        return call

    fast_s, plain_s = [9.0, 1.0, 5.0, 2.0], [9.0, 3.0, 7.0, 4.0]  # the first of each: the warm-up
    got = speed.measure(run("fast", fast_s), run("plain", plain_s), rounds=3, clock=lambda: now[0])
    assert got == (2.0, 4.0)  # medians of (1, 5, 2) and (3, 7, 4): warm-ups left out
    assert order == ["fast", "plain", "fast", "plain", "plain", "fast", "fast", "plain"]


def test_measure_times_real_work():
    import time

    fast, plain = speed.measure(lambda: time.sleep(0.002), lambda: time.sleep(0.02))
    assert 0.002 <= fast < plain and plain >= 0.02


@needs_c
def test_a_slower_fast_loss_keeps_the_plain_step_and_says_why(monkeypatch):
    fake = FakeTimes(0.2, 0.1)
    monkeypatch.setattr(speed, "measure", fake)
    step = toy_step(32)
    assert step.path == "plain" and step.fast_timing is None and fake.calls == 1
    assert step.fast_reason.startswith("not clearly faster here: fast 200 ms, plain 100 ms per step (loss "
                                       "and gradients): 0.50x, plain path kept (needs 1.2x; timed now, ")


@needs_c
@pytest.mark.parametrize("fast_s, path", [(1 / 1.1, "plain"), (1 / 1.3, "tiled-cpu")])
def test_the_fast_path_must_win_by_the_margin(monkeypatch, fast_s, path):
    monkeypatch.setattr(speed, "measure", FakeTimes(fast_s, 1.0))
    step = toy_step(32)
    assert step.path == path
    if path == "tiled-cpu":
        assert step.fast_reason is None and step.fast_timing["choice"] == "fast"
        assert step.fast_timing["speedup"] == pytest.approx(1.3, abs=1e-3)


@needs_c
def test_the_timing_is_cached_per_model_batch_threads_and_kernel_build(monkeypatch):
    fake = FakeTimes(0.1, 0.5)
    monkeypatch.setattr(speed, "measure", fake)
    first = toy_step(32)
    assert (first.path, first.fast_timing["cached"]) == ("tiled-cpu", False)
    again = toy_step(32)  # the same CPU, kernels, model, batch and threads: read back, not timed
    assert fake.calls == 1 and again.fast_timing == {**first.fast_timing, "cached": True}
    toy_step(64)  # another batch
    assert fake.calls == 2
    toy_step(32, norm="none")  # another model
    assert fake.calls == 3
    torch.set_num_threads(2)  # another thread count
    try:
        toy_step(32)
    finally:
        torch.set_num_threads(1)
    assert fake.calls == 4
    if speed.key_of("train", fused_dit.c_kernels(), build_model("ToyDiT-XS/1"))["isa"] != "avx2" \
            and fused_dit.load_c_kernels("avx2") is not None:  # another kernel build (another CPU's key)
        monkeypatch.setenv("DITNORM_FAST_ISA", "avx2")
        toy_step(32)
        assert fake.calls == 5
        monkeypatch.delenv("DITNORM_FAST_ISA")
        fake.calls = 4
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # the plain side limited to another ISA
    toy_step(32)
    assert fake.calls == 5
    # a cached record says which way it went: a slower record keeps the plain step on the next run too
    fake.times = (0.5, 0.1)
    toy_step(48)
    assert toy_step(48).fast_reason.endswith(".json)") and "cached timing" in toy_step(48).fast_reason


@needs_c
def test_the_real_timing_decides_by_its_own_numbers():
    # Whatever this CPU measures, the choice follows the times, and a step that is kept fast is the C one.
    step = toy_step(256)
    timing = step.fast_timing or json.loads(speed.record_path(speed.key_of(
        "train", fused_dit.c_kernels(), build_model("ToyDiT-XS/1"), batch=256, hybrid=True,
        diffusion=[1000, "mse"])).read_text())["timing"]
    assert timing["fast_ms"] > 0 and timing["plain_ms"] > 0
    want = "tiled-cpu" if timing["plain_ms"] / timing["fast_ms"] >= speed.MARGIN else "plain"
    assert step.path == want


@needs_c
def test_the_times_and_the_choice_are_in_the_log_and_config(tmp_path, monkeypatch):
    cfg = {"model": "ToyDiT-XS/1", "global_batch_size": 16, "max_steps": 1, "ckpt_steps": "1"}
    monkeypatch.setattr(speed, "measure", FakeTimes(0.01, 0.04))
    fast_dir = train_run(cfg, tmp_path / "fast")
    monkeypatch.setattr(speed, "measure", FakeTimes(0.04, 0.01))
    plain_dir = train_run({**cfg, "norm": "none"}, tmp_path / "plain")
    fast, plain = (json.loads((d / "config.json").read_text()) for d in (fast_dir, plain_dir))
    assert fast["step_path"] == "tiled-cpu" and fast["fast_reason"] is None
    assert {k: fast["fast_timing"][k] for k in ("fast_ms", "plain_ms", "choice")} == {
        "fast_ms": 10.0, "plain_ms": 40.0, "choice": "fast"}
    assert ("step path tiled-cpu (fast 10 ms, plain 40 ms per step (loss and gradients): 4.00x, fast path "
            "used") in (fast_dir / "log.txt").read_text()
    assert plain["step_path"] == "plain" and plain["fast_timing"] is None
    assert "fast 40 ms, plain 10 ms per step (loss and gradients): 0.25x, plain path kept" in (
        plain["fast_reason"])
    assert "(fast path not used: not clearly faster here: fast 40 ms" in (plain_dir / "log.txt").read_text()


def trained_like(name="ToyDiT-XS/1"):
    torch.manual_seed(0)
    return randomize(build_model(name).eval(), 0, std=0.01, add=True)


@needs_c
def test_a_slower_fast_sampler_keeps_the_plain_loop_and_says_why(monkeypatch):
    model, diffusion = trained_like(), create_diffusion("20")
    fake, lines = FakeTimes(0.3, 0.1), []
    monkeypatch.setattr(speed, "measure", fake)
    got = sample_toy(model, diffusion, 5, generator=torch.Generator().manual_seed(1), log=lines.append)
    y = torch.zeros(5, dtype=torch.long)
    want = diffusion.p_sample_loop(model, (5, 2, 2, 2), model_kwargs={"y": y}, clip_denoised=False,
                                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want)  # exactly the plain loop: it is what ran
    assert len(lines) == 1
    assert lines[0].startswith("fast sampler not used: not clearly faster here: fast 300 ms,")
    # "proven" skips the timing and runs the C loop, one C step per timestep
    c_steps = []
    c_step = fast_sampler._CpuSampler.step
    monkeypatch.setattr(fast_sampler._CpuSampler, "step", lambda *a: c_steps.append(1) or c_step(*a))
    proven = sample_toy(model, diffusion, 5, generator=torch.Generator().manual_seed(1), fast="proven")
    assert fake.calls == 1 and len(c_steps) == 2 * 3 + 20  # the proof's 3 steps of 2 models, the loop
    assert (proven - want).abs().max() < 1e-4 * want.abs().max()


@needs_c
def test_a_faster_fast_sampler_is_timed_once_per_sample_count(monkeypatch):
    model, diffusion = trained_like(), create_diffusion("20")
    fake, lines = FakeTimes(0.1, 0.3), []
    monkeypatch.setattr(speed, "measure", fake)
    for n in (5, 5, 7):
        sample_toy(model, diffusion, n, generator=torch.Generator().manual_seed(1), log=lines.append)
    assert fake.calls == 2 and len(lines) == 2  # said when timed, not when read back
    assert lines[0].startswith("fast sampler timed against the plain one: fast 100 ms, plain 300 ms per "
                               "step: 3.00x, fast path used")
