"""train_toy.py on CPU with gloo: world-size invariance, exact resume, NaN stop, one-line errors, learning."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import tensors_of

from diffusion import create_diffusion
from ditnorm import data, layout
from ditnorm import trainer as train_toy
from ditnorm.checkpoint import CheckpointError, load_model, read_checkpoint
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_toy.py")
# Tiny and quick, with a large lr and a short EMA so that 20 steps move every parameter measurably.
SMALL = ["--model", "ToyDiT-XS/1", "--norm", "layernorm", "--global-batch-size", "16", "--lr", "1e-3",
         "--ema-decay", "0.9", "--log-every", "5", "--seed", "3"]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run(results, *args, ranks=1, env=None, ok=True):
    """Run train_toy.py in a fresh process (under torchrun when ranks > 1); return the CompletedProcess."""
    clean = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    proc = subprocess.run([*launcher, SCRIPT, "--results-dir", str(results), *args], capture_output=True,
                          text=True, timeout=300, env={**clean, "OMP_NUM_THREADS": "1", **(env or {})})
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def only_run(results):
    """The single run folder under results."""
    (run_dir,) = list(Path(results).iterdir())
    return run_dir


def one_error_line(stderr):
    """The one error line of a failed run's stderr (library warnings may precede it)."""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr
    return errors[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One rank, 20 uninterrupted steps, checkpoints at 10 and 20; the reference for the other tests."""
    results = tmp_path_factory.mktemp("straight")
    run(results, *SMALL, "--max-steps", "20", "--ckpt-steps", "10")
    return only_run(results)


def test_run_folder_and_checkpoint_format(straight):
    assert straight.name == "000-ToyDiT-XS-1-layernorm"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["0000010.pt", "0000020.pt"]
    assert "step 0000020 | loss" in (straight / "log.txt").read_text()
    config = json.loads((straight / "config.json").read_text())
    assert (config["step_path"], config["fast_reason"]) == ("tiled-cpu", None)
    ckpt = read_checkpoint(straight / "checkpoints" / "0000020.pt")
    assert ckpt["format"] == "dit-norm-study/1" and ckpt["step"] == 20
    assert ckpt["train_args"]["global_batch_size"] == 16 and ckpt["train_args"]["lr"] == 1e-3
    # The one loader rebuilds the trained architecture, with its norm, from the checkpoint alone.
    model, config = load_model(straight / "checkpoints" / "0000020.pt", norm="layernorm", model="ToyDiT-XS/1")
    assert config == {**build_model("ToyDiT-XS/1", norm="layernorm").config, "model": "ToyDiT-XS/1"}
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], ckpt["ema"][key])  # the EMA by default
    assert not torch.equal(ckpt["ema"][key], ckpt["model"][key])
    with pytest.raises(CheckpointError, match="norm"):
        load_model(straight / "checkpoints" / "0000020.pt", norm="none")


def test_two_ranks_train_like_one(straight, tmp_path):
    proc = run(tmp_path, *SMALL, "--max-steps", "20", "--ckpt-steps", "10", ranks=2)
    assert "world size 2" in proc.stdout and proc.stdout.count("saved ") == 2  # rank 0 alone logs and saves
    one = tensors_of(straight / "checkpoints" / "0000020.pt")
    two = tensors_of(only_run(tmp_path) / "checkpoints" / "0000020.pt")
    assert one.keys() == two.keys()
    for name, value in one.items():
        # Only the summation order of the gradient (one batch vs two halves + all-reduce) differs, so
        # model, EMA and AdamW state agree to float round-off (measured: <= 3.1e-7 relative)...
        other = two[name]
        if name.endswith("attn.qkv.bias"):
            # ...except the key bias: softmax ignores it, so its true gradient is exactly 0 and AdamW
            # (eps 1e-8) turns the ~1e-10 round-off it gets into lr-sized steps that differ between runs.
            value, other = (torch.cat([v[:len(v) // 3], v[2 * len(v) // 3:]]) for v in (value, other))
        assert (other - value).norm() <= 1e-6 * value.norm(), name


def test_resume_is_bit_identical(straight, tmp_path):
    run(tmp_path, *SMALL, "--max-steps", "10")
    run_dir = only_run(tmp_path)
    run(tmp_path, "--resume", str(run_dir), "--max-steps", "20")  # model, norm, batch... from the checkpoint
    assert only_run(tmp_path) == run_dir  # continued in the same folder
    log = (run_dir / "log.txt").read_text()
    assert "resumed from" in log and log.count("step 0000010 | loss") == 1
    assert log.count("done: 10 steps") == 2  # each run logs its loop's total
    resumed = tensors_of(run_dir / "checkpoints" / "0000020.pt")
    reference = tensors_of(straight / "checkpoints" / "0000020.pt")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_nan_stops_with_one_line_and_keeps_last_checkpoint(tmp_path):
    proc = run(tmp_path, *SMALL, "--max-steps", "20", "--ckpt-steps", "10", "--debug-nan-at-step", "13",
               ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = one_error_line(proc.stderr)
    checkpoints = only_run(tmp_path) / "checkpoints"
    assert line.startswith("error: loss is nan at step 13;") and str(checkpoints / "0000010.pt") in line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000010.pt"]  # nothing after the NaN is saved
    model, _ = load_model(checkpoints / "0000010.pt", use_ema=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_input_from_the_command_line(tmp_path):
    """End to end: a process exits non-zero with one line on stderr and no traceback."""
    proc = run(tmp_path, *SMALL, "--global-batch-size", "15", ok=False,
               env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = one_error_line(proc.stderr)
    assert "--global-batch-size 15 must be a multiple of the world size 2" in line
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.fixture(scope="module")
def broken(straight, tmp_path_factory):
    """Files a user may pass by mistake: a checkpoint without its optimizer state, one with NaN weights (as
    the code before this check saved), a text file, and a file where a folder belongs."""
    folder = tmp_path_factory.mktemp("broken")
    ckpt = read_checkpoint(straight / "checkpoints" / "0000020.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "opt"}, folder / "no_opt.pt")
    nan = {k: torch.full_like(v, math.nan) for k, v in ckpt["model"].items()}
    torch.save({**ckpt, "model": nan}, folder / "nan.pt")
    (folder / "afile").write_text("a file, not a folder\n")
    return folder


@pytest.mark.parametrize("args, env, message", [
    (["--norm", "groupnorm"], {}, "argument --norm: invalid choice"),
    (["--global-batch-size", "15"], {"WORLD_SIZE": "2"}, "multiple of the world size 2"),
    (["--max-steps", "0"], {}, "--max-steps: '0' is not a positive integer"),
    (["--lr", "1e39"], {}, "--lr: '1e39' is not a finite number > 0"),
    (["--ckpt-steps", "10k"], {}, "--ckpt-steps: '10k' is not a comma-separated list of positive steps"),
    (["--ckpt-steps", "0,-5", "--max-steps", "2"], {}, "'0,-5' is not a comma-separated list of positive"),
    # A schedule the diffusion cannot take (beta >= 1), or one whose arrays would not fit in memory.
    (["--diffusion-steps", "10", "--max-steps", "2"], {}, "not a diffusion length the linear schedule"),
    (["--diffusion-steps", "1000001", "--max-steps", "2"], {}, "(1, or 21 to 100000; DiT's is 1000)"),
    (["--device", "tpu"], {}, "--device: 'tpu' is not a device; use cpu, cuda or cuda:N"),
    (["--results-dir", "{broken}/afile"], {}, "afile is a file, not a folder; pass a folder"),
    (["--results-dir", "{broken}/afile/runs"], {}, "afile is a file, not a folder; pass a folder"),
    (["--resume", "{broken}/no_opt.pt", "--max-steps", "30"], {}, "lacks opt: it can be sampled but not"),
    (["--resume", "{broken}/nan.pt", "--max-steps", "30"], {},
     "holds non-finite model weights (a diverged run); resume from an earlier checkpoint"),
    (["--resume", "no/such/run"], {}, "no such checkpoint file or run folder"),
    (["--resume", "{run}", "--norm", "none"], {}, "holds norm 'layernorm', not --norm 'none'"),
    (["--resume", "{run}", "--model", "ToyDiT/1"], {}, "holds model 'ToyDiT-XS/1', not --model 'ToyDiT/1'"),
    (["--resume", "{run}/checkpoints/0000010.pt"], {}, "has later checkpoints (0000020.pt)"),
    (["--resume", "{run}", "--max-steps", "20"], {}, "already at step 20; pass a --max-steps above it"),
    (["--resume", "{run}/log.txt"], {}, "log.txt"),  # not a checkpoint at all
])
def test_bad_input_is_one_line(straight, broken, tmp_path, monkeypatch, capsys, args, env, message):
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["--results-dir", str(tmp_path),
            *(arg.replace("{run}", str(straight)).replace("{broken}", str(broken)) for arg in args)]
    with pytest.raises(SystemExit) as exit_info:
        train_toy.main(argv)
    assert exit_info.value.code not in (0, None)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line
    assert not list(tmp_path.iterdir())  # no run folder for a refused run


def in_process(monkeypatch, argv):
    """train_toy.main(argv) as one process would run it (no torchrun variables); its SystemExit, if any."""
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    try:
        train_toy.main(argv)
    except SystemExit as stop:
        return stop
    return None


def test_nonfinite_weights_are_never_saved_nor_called_good(tmp_path, monkeypatch):
    """lr 1e38 is finite, but AdamW's first step size lr / (1 - beta1) is inf in float32: step 1's loss is
    finite, its update is not. The code before this check saved that NaN model (exit 0 with --max-steps 1;
    with --ckpt-every 1 the NaN stop of step 2 then called it "the last good checkpoint")."""
    flags = [*SMALL, "--lr", "1e38", "--results-dir", str(tmp_path)]
    stop = in_process(monkeypatch, [*flags, "--max-steps", "3", "--ckpt-every", "1"])
    assert stop is not None and stop.code.startswith("error: the model, ema") and "step 1, so nothing was" \
        " saved" in stop.code and stop.code.endswith("the last good checkpoint is none (none saved yet)")
    assert not list(tmp_path.rglob("*.pt"))
    stop = in_process(monkeypatch, [*flags, "--max-steps", "1"])
    assert stop is not None and "not finite after step 1" in stop.code and not list(tmp_path.rglob("*.pt"))


def test_a_write_failure_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    def full_disk(obj, path):
        if Path(path).name == "0000004.pt":
            raise OSError(28, "No space left on device", str(path))
        real_save(obj, path)

    real_save = train_toy.save_checkpoint
    monkeypatch.setattr(train_toy, "save_checkpoint", full_disk)
    stop = in_process(monkeypatch, [*SMALL, "--max-steps", "6", "--ckpt-every", "2", "--results-dir",
                                    str(tmp_path)])
    checkpoints = only_run(tmp_path) / "checkpoints"
    assert stop is not None and stop.code == (
        f"error: cannot write {checkpoints / '0000004.pt'} (No space left on device); training stopped, the "
        f"last good checkpoint is {checkpoints / '0000002.pt'}; free space (or fix the folder) and resume it")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0000002.pt"]


def test_a_failed_start_leaves_no_run_folder(tmp_path, monkeypatch):
    def broken_step(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the fast path is being checked

    monkeypatch.setattr(train_toy, "proven_loss", broken_step)
    with pytest.raises(KeyboardInterrupt):
        in_process(monkeypatch, [*SMALL, "--max-steps", "2", "--results-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_recipe_is_one_of_the_recipe_table_and_preset_its_deprecated_name(tmp_path, monkeypatch, capsys):
    from ditnorm.recipes import RECIPES

    flags = ["--model", "ToyDiT-XS/1", "--max-steps", "1", "--global-batch-size", "16"]  # flags win
    assert in_process(monkeypatch, [*flags, "--recipe", "cpu", "--results-dir", str(tmp_path / "r")]) is None
    assert "--preset" not in capsys.readouterr().err
    assert in_process(monkeypatch, [*flags, "--preset", "cpu", "--results-dir", str(tmp_path / "p")]) is None
    assert capsys.readouterr().err.strip().splitlines() == [
        "train_toy.py: --preset is deprecated (a preset is experiment.py's); use --recipe cpu"]
    for folder in ("r", "p"):
        got = read_checkpoint(only_run(tmp_path / folder) / "checkpoints" / "0000001.pt")["train_args"]
        want = dict(RECIPES["cpu"], max_steps=1, global_batch_size=16)
        assert {k: got[k] for k in want} == want


def test_a_log_interval_beyond_the_run_trains(tmp_path, monkeypatch):
    # The loss buffer was log_every long: --log-every 10**12 asked for 4 TB before the first step.
    assert in_process(monkeypatch, [*SMALL, "--max-steps", "3", "--log-every", str(10**12), "--results-dir",
                                    str(tmp_path)]) is None
    assert "step 0000003 | loss" in (only_run(tmp_path) / "log.txt").read_text()


def test_training_lowers_the_loss(tmp_path):
    run(tmp_path, "--model", "ToyDiT-XS/1", "--norm", "layernorm", "--global-batch-size", "64",
        "--lr", "1e-3", "--max-steps", "300", "--log-every", "100")
    trained, _ = load_model(only_run(tmp_path) / "checkpoints" / "0000300.pt", use_ema=False)
    initial = build_model("ToyDiT-XS/1", norm="layernorm").eval()  # adaLN-Zero: predicts eps = 0

    # The training objective on one fixed batch of the constant-zero data, timesteps spread over [0, T).
    diffusion = create_diffusion(timestep_respacing="")
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, diffusion.num_timesteps, (4096,), generator=generator)
    noise = torch.randn(4096, 2, 2, 2, generator=generator)
    x_start, y = torch.zeros(4096, 2, 2, 2), torch.zeros(4096, dtype=torch.long)
    with torch.no_grad():
        outs = [diffusion.training_losses(m, x_start, t, model_kwargs={"y": y}, noise=noise)
                for m in (initial, trained)]
    mse, loss = [out["mse"].mean() for out in outs], [out["loss"].mean() for out in outs]
    assert mse[0] == pytest.approx(1.0, abs=0.05)  # predicting eps = 0 leaves the noise's own variance
    # Measured after 300 steps: mse 0.008 and hybrid loss 0.011 (layernorm), 0.021 / 0.026 with norm "none".
    assert mse[1] < 0.05 and loss[1] < 0.05 < loss[0], (mse, loss)


def test_run_folders_never_reuse_an_index(tmp_path):
    (tmp_path / "000-ToyDiT-1-none").mkdir()
    (tmp_path / "004-ToyDiT-1-layernorm").mkdir()
    (tmp_path / "notes").mkdir()
    assert layout.new_run_dir(tmp_path, "ToyDiT/1", "none").name == "005-ToyDiT-1-none"
    assert layout.new_run_dir(tmp_path, "ToyDiT-XS/1", "dyt").name == "006-ToyDiT-XS-1-dyt"


def test_constant_images_are_one_value_per_sample_and_rank_invariant():
    shape = (2, 2, 2)
    full = data.constant_images(5, 7, 64, 0, 1, shape, "cpu")  # (64, 2, 2, 2)
    flat = full.reshape(64, -1)
    assert full.shape == (64, *shape) and torch.equal(flat, flat[:, :1].expand_as(flat))
    low, high = data.CONSTANT_RANGE
    assert low <= flat.min() < -0.5 and 0.5 < flat.max() <= high  # spread over the range
    halves = [data.constant_images(5, 7, 64, rank, 2, shape, "cpu") for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), full)  # the same global batch on 2 ranks
    assert not torch.equal(full, data.constant_images(5, 8, 64, 0, 1, shape, "cpu"))


def test_constant_data_trains_and_is_saved(straight, tmp_path):
    run(tmp_path, *SMALL, "--max-steps", "20", "--ckpt-steps", "10", "--data", "constant")
    path = only_run(tmp_path) / "checkpoints" / "0000020.pt"
    assert read_checkpoint(path)["train_args"]["data"] == "constant"
    assert read_checkpoint(straight / "checkpoints" / "0000020.pt")["train_args"]["data"] == "zeros"
    key = "blocks.0.attn.qkv.weight"  # other data, same (seed, step) noise: other parameters
    assert not torch.equal(tensors_of(path)[f"model.{key}"],
                           tensors_of(straight / "checkpoints" / "0000020.pt")[f"model.{key}"])



def test_seconds_since_process_start_counts_from_the_process_start():
    code = ("import sys, time; time.sleep(0.5); sys.path.insert(0, 'benchmarks'); import bench_startup; "
            "print(bench_startup.seconds_since_process_start())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    if proc.stdout.strip() == "None":
        pytest.skip("no /proc here")
    assert 0.5 <= float(proc.stdout) < 60  # the sleep, the imports; not the machine's uptime


def test_the_step_path_and_why_are_in_the_log_and_config(tmp_path):
    run(tmp_path / "auto", *SMALL, "--max-steps", "2")
    run(tmp_path / "off", *SMALL, "--max-steps", "2", "--fast", "off")
    auto, off = (json.loads((only_run(tmp_path / k) / "config.json").read_text()) for k in ("auto", "off"))
    assert (auto["fast"], auto["step_path"], auto["fast_reason"]) == ("auto", "tiled-cpu", None)
    assert (off["fast"], off["step_path"], off["fast_reason"]) == ("off", "plain", "fast='off'")
    log = (only_run(tmp_path / "off") / "log.txt").read_text()
    assert "step path plain (fast path not used: fast='off')" in log


def test_an_edited_model_is_what_train_toy_trains(tmp_path, monkeypatch, capsys):
    """A researcher's edit to models.py (here in memory) trains: the C path is refused, the log says why, and
    the checkpoint is the one the plain step of the edited model gives."""
    import models

    monkeypatch.setattr(models.DynamicTanh, "forward", lambda self, x: torch.tanh(2 * self.alpha * x))
    flags = [*SMALL[:3], "dyt", *SMALL[4:], "--max-steps", "3"]
    train_toy.main([*flags, "--results-dir", str(tmp_path / "auto")])
    train_toy.main([*flags, "--results-dir", str(tmp_path / "off"), "--fast", "off"])
    log = (only_run(tmp_path / "auto") / "log.txt").read_text()
    assert "fast path not used: the gradient of" in log and "step path plain" in log
    edited, plain = (tensors_of(only_run(tmp_path / k) / "checkpoints" / "0000003.pt")
                     for k in ("auto", "off"))
    assert all(torch.equal(edited[k], plain[k]) for k in plain)
