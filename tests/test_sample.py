"""sample.py on tiny randomly initialised checkpoints (toy, latent) and a tiny AutoencoderKL; no network."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import make_latent_checkpoint, make_toy_runs, make_vae, perturb_zero_init, save_model
from PIL import Image

import sample
from diffusion import create_diffusion
from fast import sample_toy
from models import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    runs = make_toy_runs(d / "results")
    return dict(toy=runs["layernorm"] / "checkpoints" / "0000020.pt",
                latent=make_latent_checkpoint(d / "latent.pt"), vae=make_vae(d / "vae"), dir=d)


def test_toy_samples_npz_and_stats(files, tmp_path, capsys):
    out, scatter = tmp_path / "s.npz", tmp_path / "scatter.png"
    sample.main(["--ckpt", str(files["toy"]), "--num-samples", "8", "--num-sampling-steps", "10",
                 "--out", str(out), "--scatter", str(scatter)])
    data = np.load(out)
    assert data["samples"].shape == (8, 2, 2, 2)
    a = np.abs(data["samples"])
    assert np.isfinite(a).all() and a.max() > 0  # the perturbed model is not the zero function
    printed = capsys.readouterr().out
    assert f"max {a.max():.3e}" in printed and f"median {np.median(a):.3e}" in printed
    assert f"mean {a.mean():.3e}" in printed
    assert "(zeros data)" in printed and f"|x| mean {a.mean():.3e}" in printed
    assert scatter.stat().st_size > 0


def test_constant_data_checkpoint_reports_the_distance_to_a_constant_image(tmp_path, capsys):
    # |x| is no error for a model trained on c * ones: its samples should be constant images, c ~ U[-1, 1].
    model = perturb_zero_init(build_model("ToyDiT-XS/1"), seed=3)
    ckpt = save_model(model, "ToyDiT-XS/1", tmp_path / "c.pt", train_args={"data": "constant"})
    out = tmp_path / "c.npz"
    sample.main(["--ckpt", str(ckpt), "--num-samples", "6", "--num-sampling-steps", "5", "--out", str(out)])
    data = np.load(out)
    x = data["samples"].reshape(6, -1)
    dev = np.abs(x - x.mean(1, keepdims=True))
    printed = capsys.readouterr().out
    assert "(constant data)" in printed and "|x| mean" not in printed
    assert f"|x - mean(x)| mean {dev.mean():.3e}  median {np.median(dev):.3e}  max {dev.max():.3e}" in printed
    assert str(data["data"]) == "constant" and 0 < float(data["ks_c"]) <= 1
    assert f"Kolmogorov-Smirnov distance {float(data['ks_c']):.3f}" in printed


def test_latent_cfg_grid_with_local_vae(files, tmp_path, capsys):
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", str(files["latent"]), "--vae", str(files["vae"]), "--num-samples", "5",
                 "--class-labels", "1", "2", "--num-sampling-steps", "3", "--out", str(out)])
    # 5 images of 32x32 (4x4 latents, 8x upsampling) in a 3-column grid with 2-pixel padding, as the
    # official save_image lays them out; the decoded samples beside it.
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3) and (grid[:2] == 0).all()
    saved = np.load(out.with_suffix(".npz"))
    assert saved["samples"].shape == (5, 3, 32, 32) and saved["labels"].tolist() == [1, 2, 1, 2, 1]
    first = np.clip((saved["samples"][0] + 1) / 2 * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(grid[2:34, 2:34], first)
    assert "labels [1, 2, 1, 2, 1]" in capsys.readouterr().out


def test_cfg_channels_variants_agree_on_guided_channels():
    model = perturb_zero_init(build_model("DiT-S/2", input_size=4, depth=1, hidden_size=64, num_heads=2,
                                          num_classes=10)).eval()
    x = torch.randn(2, 4, 4, 4)
    x = torch.cat([x, x])
    t, y = torch.tensor([500] * 4), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        all_channels = sample.guided_model(model, 4.0, "all")(x, t, y)
        first3 = sample.guided_model(model, 4.0, "3")(x, t, y)
        plain = model(x, t, y)
    torch.testing.assert_close(first3[:, :3], all_channels[:, :3])
    torch.testing.assert_close(first3[:, 3:], plain[:, 3:])  # channel 3 and the variances unguided
    assert not torch.allclose(all_channels[:, 3], plain[:, 3])


@pytest.mark.parametrize("case, expected", [
    ("missing", "not found"),
    ("label", "out of range"),
    ("toy_vae", "toy"),
    ("toy_image_size", "toy"),
    ("bad_vae", "pass a local folder with --vae"),
    ("no_vae_folder", "not found"),
])
def test_bad_input_is_one_line(files, tmp_path, capsys, case, expected):
    (tmp_path / "not_a_vae").mkdir()
    argv = {
        "missing": ["--ckpt", str(tmp_path / "nope.pt")],
        "label": ["--ckpt", str(files["latent"]), "--class-labels", "1000", "--vae", str(files["vae"])],
        "toy_vae": ["--ckpt", str(files["toy"]), "--vae", str(files["vae"])],
        "toy_image_size": ["--ckpt", str(files["toy"]), "--image-size", "256"],
        "bad_vae": ["--ckpt", str(files["latent"]), "--vae", str(tmp_path / "not_a_vae")],
        "no_vae_folder": ["--ckpt", str(files["latent"]), "--vae", str(tmp_path / "missing_vae")],
    }[case]
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--num-sampling-steps", "2", "--out", str(tmp_path / "x")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and line.startswith("sample.py: error: ") and expected in line


def test_a_toy_samples_on_its_own_schedule(tmp_path, capsys):
    """A model trained with --diffusion-steps 100 was sampled on DiT's T = 1000, silently."""
    model = perturb_zero_init(build_model("ToyDiT-XS/1"), seed=5).eval()
    ckpt = save_model(model, "ToyDiT-XS/1", tmp_path / "t100.pt", train_args={"diffusion_steps": 100})
    sample.main(["--ckpt", str(ckpt), "--num-samples", "6", "--out", str(tmp_path / "s.npz")])
    assert "6 samples, 100 steps" in capsys.readouterr().out
    own = sample_toy(model, create_diffusion("", diffusion_steps=100), 6,
                     generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"], own.double().numpy())
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--num-sampling-steps", "200", "--out", str(tmp_path / "x.npz")])
    assert e.value.code == 2
    assert "200 sampling steps do not fit a 100-step diffusion; pass 1 to 100" in capsys.readouterr().err


def test_a_plain_toy_state_dict_samples_with_the_norm_given(tmp_path, capsys):
    model = perturb_zero_init(build_model("ToyDiT-XS/1", norm="none"), seed=6).eval()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    argv = ["--ckpt", str(tmp_path / "plain.pt"), "--num-samples", "4", "--num-sampling-steps", "5"]
    with pytest.raises(SystemExit) as e:
        sample.main([*argv, "--out", str(tmp_path / "a.npz")])
    assert e.value.code == 2 and "its norm is not known; give it" in capsys.readouterr().err
    sample.main([*argv, "--norm", "none", "--out", str(tmp_path / "b.npz")])
    own = sample_toy(model, create_diffusion("5"), 4, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["samples"], own.double().numpy())


@pytest.mark.parametrize("flags, expected, status", [
    (["--device", "tpu"], "argument --device: 'tpu' is not a device; use cpu, cuda or cuda:N", 2),
    (["--seed", str(2**64)], "argument --seed: '18446744073709551616' is not a seed in [0, 2^63)", 2),
    (["--num-samples", "abc"], "argument --num-samples: 'abc' is not a positive integer", 2),  # no usage
    (["--num-samples", "0"], "'0' is not a positive integer", 2),
    (["--out", "{tmp}/afile/x.npz"], "afile is a file, not a folder; pass a folder", 2),
    (["--out", "{tmp}"], "is a folder; pass a file name", 2),
    (["--scatter", "{tmp}/afile/x.png"], "--scatter", 2),
    (["--ckpt", "{tmp}/no_config.pt"], "no_config.pt lacks its config; pass a complete checkpoint", 2),
    (["--ckpt", "{tmp}/afile"], "cannot read", 2),
])
def test_more_bad_input_is_one_line(files, tmp_path, capsys, flags, expected, status):
    (tmp_path / "afile").write_text("not a folder\n")
    ckpt = torch.load(files["toy"], weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "config"}, tmp_path / "no_config.pt")
    argv = ["--ckpt", str(files["toy"]), "--num-sampling-steps", "2", "--out", str(tmp_path / "x.npz"),
            *(flag.replace("{tmp}", str(tmp_path)) for flag in flags)]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == status and line.startswith("sample.py: error: ") and expected in line, line


def test_a_write_failure_is_one_line_with_status_1(files, tmp_path, capsys, monkeypatch):
    def full_disk(path, **arrays):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(sample.np, "savez", full_disk)
    out = tmp_path / "x.npz"
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(files["toy"]), "--num-sampling-steps", "2", "--out", str(out)])
    err = capsys.readouterr().err  # the sampler's progress, then the one line
    line = err.strip().splitlines()[-1]
    assert e.value.code == 1 and "Traceback" not in err
    assert line == f"sample.py: error: cannot write {out} (No space left on device); free space or pass " \
        "another --out"


def test_bad_input_exit_code_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "nope.pt")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_run_folder_step_and_raw_weights(files, tmp_path, capsys):
    run = files["toy"].parent.parent  # a run folder with checkpoints at steps 10 and 20
    common = ["--num-samples", "4", "--num-sampling-steps", "5"]
    sample.main(["--ckpt", str(run), *common, "--out", str(tmp_path / "last.npz")])
    assert str(np.load(tmp_path / "last.npz")["ckpt"]).endswith("0000020.pt")  # the run's last checkpoint
    sample.main(["--ckpt", str(run), "--step", "10", "--weights", "raw", *common,
                 "--out", str(tmp_path / "r.npz")])
    assert str(np.load(tmp_path / "r.npz")["ckpt"]).endswith("0000010.pt")
    assert "raw weights" in capsys.readouterr().out


def test_raw_weights_of_the_toy_checkpoint_differ_from_its_ema(tmp_path):
    raw, ema = (perturb_zero_init(build_model("ToyDiT-XS/1"), seed=s) for s in (1, 2))
    ckpt = save_model(raw, "ToyDiT-XS/1", tmp_path / "c.pt")
    state = torch.load(ckpt, weights_only=True)
    state["ema"] = ema.state_dict()
    torch.save(state, ckpt)
    for weights in ("ema", "raw"):
        sample.main(["--ckpt", str(ckpt), "--weights", weights, "--num-samples", "3",
                     "--num-sampling-steps", "4", "--out", str(tmp_path / f"{weights}.npz")])
    assert not np.allclose(np.load(tmp_path / "ema.npz")["samples"], np.load(tmp_path / "raw.npz")["samples"])


@pytest.mark.parametrize("case, expected", [
    ("empty_folder", "is a folder without checkpoints/<step>.pt"),
    ("missing_step", "has no checkpoint at step 30"),
    ("step_with_file", "--step picks a checkpoint of a run folder"),
    ("raw_of_plain_state_dict", "holds one set of weights only"),
])
def test_bad_folder_or_weights_is_one_line(files, tmp_path, case, expected, capsys):
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain.pt"
    torch.save(build_model("ToyDiT-XS/1").state_dict(), plain)
    run = files["toy"].parent.parent
    argv = {
        "empty_folder": ["--ckpt", str(tmp_path / "empty")],
        "missing_step": ["--ckpt", str(run), "--step", "30"],
        "step_with_file": ["--ckpt", str(files["toy"]), "--step", "10"],
        "raw_of_plain_state_dict": ["--ckpt", str(plain), "--weights", "raw"],
    }[case]
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--num-sampling-steps", "2", "--out", str(tmp_path / "x")])
    message = capsys.readouterr().err
    assert e.value.code == 2 and message.startswith("sample.py: error: ") and expected in message
    assert message.count("\n") == 1
