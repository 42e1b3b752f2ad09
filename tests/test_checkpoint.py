import argparse
import math
import os
import stat
from pathlib import PurePosixPath

import pytest
import torch
from builders import randomize

from ditnorm import checkpoint
from ditnorm.checkpoint import (
    FORMAT,
    OFFICIAL_CHECKPOINTS,
    CheckpointError,
    download_official,
    infer_official_config,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from models import build_model


def randomized(name="ToyDiT-XS/1", seed=0, **overrides):
    """A registry model whose every trainable parameter is random (adaLN-Zero would make outputs 0)."""
    return randomize(build_model(name, **overrides), seed)


def ours(model, ema, name="ToyDiT-XS/1"):
    """A checkpoint in this repository's format."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(2, 2, 2, 2), torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)).sum().backward()
    optimizer.step()
    return {
        "format": FORMAT, "config": {"model": name, **model.config}, "model": model.state_dict(),
        "ema": ema.state_dict(), "opt": optimizer.state_dict(), "step": 10, "train_args": {"lr": 1e-4},
        "rng": {"torch": torch.get_rng_state()},
    }


def outputs(model, batch=3):
    g = torch.Generator().manual_seed(123)
    C, H = model.in_channels, model.config["input_size"]
    x = torch.randn(batch, C, H, H, generator=g)
    t, y = torch.tensor([0, 400, 999][:batch]), torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        return model(x, t, y)


@pytest.mark.parametrize("norm", ["layernorm", "none", "dyt"])
def test_round_trip_of_our_format(tmp_path, norm):
    model, ema = randomized(norm=norm, seed=0), randomized(norm=norm, seed=1)
    path = tmp_path / "run" / "0000010.pt"
    save_checkpoint(ours(model, ema), path)
    assert read_checkpoint(path)["step"] == 10

    loaded, config = load_model(path)
    assert config == {**ema.config, "model": "ToyDiT-XS/1"} and config["norm"] == norm
    assert not loaded.training and not loaded.pos_embed.requires_grad
    assert loaded.x_embedder.proj.weight.requires_grad
    assert torch.equal(outputs(loaded), outputs(ema.eval()))
    raw, _ = load_model(path, use_ema=False, norm=norm, model="ToyDiT-XS/1")
    assert torch.equal(outputs(raw), outputs(model.eval()))
    if norm == "dyt":
        assert torch.equal(loaded.blocks[1].norm2.alpha, ema.blocks[1].norm2.alpha)


def test_mismatched_norm_or_model_is_refused(tmp_path):
    path = tmp_path / "none.pt"
    save_checkpoint(ours(randomized(norm="none"), randomized(norm="none")), path)
    with pytest.raises(CheckpointError, match="norm=none model, not norm=layernorm"):
        load_model(path, norm="layernorm")
    with pytest.raises(CheckpointError, match="ToyDiT-XS/1 model, not ToyDiT/1"):
        load_model(path, model="ToyDiT/1")



def official_shapes(name="DiT-S/8", **overrides):
    """The state dict of an official architecture, on the meta device (no 33M random weights to write)."""
    with torch.device("meta"):
        return build_model(name, **overrides).state_dict()


def test_an_official_architecture_is_layernorm_and_says_why(tmp_path, monkeypatch):
    path = tmp_path / "official.pt"
    path.write_bytes(b"")  # read_checkpoint is replaced below: only the path must exist
    monkeypatch.setattr(checkpoint, "read_checkpoint", lambda p: official_shapes(input_size=8))
    with pytest.raises(CheckpointError, match=r"norm=layernorm model \(an official DiT architecture: "
                       r"layernorm by definition\), not norm=none"):
        load_model(path, norm="none")


def test_a_plain_toy_state_dict_needs_its_norm(tmp_path):
    """A toy model's own state_dict() is no official checkpoint: it was read as LayerNorm (its outputs then
    52% off for norm="none"), and an explicit norm="none" was refused as "not norm=none"."""
    model = randomized(norm="none").eval()
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="plain state dict of a ToyDiT-XS/1 model, no official DiT "
                       "architecture, so its norm is not known; give it"):
        load_model(path)
    loaded, config = load_model(path, norm="none")
    assert config == {**model.config, "model": "ToyDiT-XS/1"} and config["norm"] == "none"
    assert torch.equal(outputs(loaded), outputs(model))
    as_layernorm, _ = load_model(path, norm="layernorm")  # what the old code silently built
    off = (outputs(as_layernorm) - outputs(model)).norm() / outputs(model).norm()
    assert off > 0.1, off


def test_config_without_norm_is_refused(tmp_path):
    ckpt = ours(randomized(), randomized())
    del ckpt["config"]["norm"]
    save_checkpoint(ckpt, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="lacks norm"):
        load_model(tmp_path / "old.pt")


def test_plain_state_dict_config_from_shapes(tmp_path):
    # A null row (num_classes 3 + 1) and a 4x4 input: both must be recovered from the shapes alone (the norm,
    # which leaves no trace there, is given: a toy architecture is no official one).
    model = randomized(num_classes=3, class_dropout_prob=0.1, input_size=4).eval()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    loaded, config = load_model(tmp_path / "plain.pt", norm="layernorm")
    assert config == {**model.config, "model": "ToyDiT-XS/1"}
    assert torch.equal(outputs(loaded), outputs(model))


def test_official_training_format_with_namespace_args(tmp_path):
    model, ema = randomized(seed=0), randomized(seed=1)
    args = argparse.Namespace(model="ToyDiT-XS/1", num_classes=1, image_size=16, global_seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    path = tmp_path / "0050000.pt"
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict()}
    torch.save({**state, "args": args}, path)
    loaded, config = load_model(path)
    assert config == {**model.config, "model": "ToyDiT-XS/1"} and config["norm"] == "layernorm"
    assert torch.equal(outputs(loaded), outputs(ema.eval()))
    raw, _ = load_model(path, use_ema=False)
    assert torch.equal(outputs(raw), outputs(model.eval()))


def test_infer_official_dit_xl2_from_shapes():
    with torch.device("meta"):
        shapes_256 = build_model("DiT-XL/2").state_dict()
        shapes_512 = build_model("DiT-XL/2", input_size=64).state_dict()
    expected = dict(model="DiT-XL/2", input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                    num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                    norm="layernorm")
    assert infer_official_config(shapes_256) == expected
    assert infer_official_config(shapes_512) == {**expected, "input_size": 64}


def test_state_dict_that_does_not_fit_names_keys(tmp_path):
    ckpt = ours(randomized(), randomized())
    ckpt["ema"]["blocks.0.extra.weight"] = torch.zeros(1)
    del ckpt["ema"]["blocks.1.mlp.fc2.bias"]
    save_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.mlp\.fc2\.bias; unexpected: blocks\.0"):
        load_model(tmp_path / "bad.pt")


def test_missing_path_message(tmp_path):
    expected = "not found; pass a path to a checkpoint or one of DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt"
    with pytest.raises(CheckpointError, match=expected):
        load_model(tmp_path / "nope.pt")


def test_unsafe_pickles_and_garbage_are_refused(tmp_path):
    torch.save({"model": {}, "args": PurePosixPath("x")}, tmp_path / "unsafe.pt")  # not allow-listed
    with pytest.raises(CheckpointError, match="holds a pathlib.PurePosixPath object, not plain data"):
        read_checkpoint(tmp_path / "unsafe.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "garbage.pt")


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    old = read_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_nonfinite_weights_are_never_written(tmp_path):
    model = randomized()
    good = ours(model, model)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(good, path)
    for part in ("model", "ema"):
        bad = {**good, part: {k: torch.full_like(v, math.inf) if k == "pos_embed" else v
                              for k, v in good[part].items()}}
        with pytest.raises(CheckpointError, match=f"not saving .*: its {part} weights are not finite"):
            save_checkpoint(bad, tmp_path / f"{part}.pt")
    average = {"kind": "ema", "value": 0.9, "tensors": {"pos_embed": torch.full((3,), math.nan)}}
    with pytest.raises(CheckpointError, match="its averages/ema_0.9 weights are not finite"):
        save_checkpoint({**good, "averages": {"ema_0.9": average}}, tmp_path / "averages.pt")
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # nothing written, not even a temporary file


def test_checkpoints_have_the_permissions_of_the_logs(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({"step": 1}, tmp_path / "a.pt")
        os.umask(0o027)
        save_checkpoint({"step": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == 0o644  # was 0600 (mkstemp's)
    assert stat.S_IMODE(os.stat(tmp_path / "b.pt").st_mode) == 0o640


def test_stale_temporary_files_are_removed_on_the_next_save(tmp_path):
    gone = int(open("/proc/sys/kernel/pid_max").read()) + 1 if os.path.exists("/proc/sys/kernel/pid_max") \
        else 2**22 + 1  # no process has this id
    stale = [f".0000010.pt.{gone}.abcd_123.tmp", ".0000020.pt.k2j4h5g6.tmp"]  # a killed save; an older one
    alive = f".0000030.pt.{os.getppid()}.zzzz9999.tmp"  # its writer still runs
    for name in [*stale, alive, "notes.tmp"]:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    save_checkpoint({"step": 40}, tmp_path / "0000040.pt")
    assert sorted(os.listdir(tmp_path)) == sorted([alive, "notes.tmp", "0000040.pt"])


def test_a_checkpoint_lacking_parts_is_one_error(tmp_path):
    ckpt = ours(randomized(), randomized())
    torch.save({k: v for k, v in ckpt.items() if k != "model"}, tmp_path / "no_model.pt")
    with pytest.raises(CheckpointError, match="no_model.pt lacks its model; pass a complete checkpoint"):
        load_model(tmp_path / "no_model.pt", use_ema=False)
    load_model(tmp_path / "no_model.pt")  # the EMA alone still samples
    torch.save({k: v for k, v in ckpt.items() if k != "config"}, tmp_path / "no_config.pt")
    with pytest.raises(CheckpointError, match="no_config.pt lacks its config; pass a complete checkpoint"):
        load_model(tmp_path / "no_config.pt")


def test_the_diffusion_comes_from_the_checkpoint():
    assert checkpoint.diffusion_of({}).num_timesteps == 1000  # official ones, and ours from before the flag
    short = checkpoint.diffusion_of({"diffusion_steps": 100})
    assert short.num_timesteps == 100 and short.betas[-1] == pytest.approx(0.2)  # 0.02 * 1000 / 100
    assert checkpoint.diffusion_of({"diffusion_steps": 100}, 10).num_timesteps == 10
    with pytest.raises(CheckpointError, match="200 sampling steps do not fit a 100-step diffusion; pass 1"):
        checkpoint.diffusion_of({"diffusion_steps": 100}, 200)


def test_download_failure_is_a_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def failing_fetch(url, dst):
        calls.append(url)
        with open(dst, "wb") as f:
            f.write(b"partial")
        raise OSError("network is unreachable")

    monkeypatch.setattr(checkpoint, "_fetch", failing_fetch)
    with pytest.raises(CheckpointError, match="failed.*download it manually to pretrained_models/DiT-XL-2"):
        load_model("DiT-XL-2-256x256.pt")
    assert calls == ["https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"]
    assert os.listdir(tmp_path / "pretrained_models") == []  # no partial file under any name
    with pytest.raises(CheckpointError, match="not found"):
        load_model("DiT-XL-2-512x512.pt", download=False)
    assert len(calls) == 1


def test_download_success_goes_to_pretrained_models(tmp_path, monkeypatch):
    model = randomized()

    def fake_fetch(url, dst):
        assert url == OFFICIAL_CHECKPOINTS["DiT-XL-2-512x512.pt"][1]
        torch.save(model.state_dict(), dst)

    monkeypatch.setattr(checkpoint, "_fetch", fake_fetch)
    path = download_official("DiT-XL-2-512x512.pt", root=tmp_path / "pretrained_models")
    assert path == tmp_path / "pretrained_models" / "DiT-XL-2-512x512.pt"
    assert os.listdir(path.parent) == ["DiT-XL-2-512x512.pt"]
    loaded, _ = load_model(path, norm="layernorm")  # a toy stands in for the official weights: give its norm
    assert torch.equal(outputs(loaded), outputs(model.eval()))
