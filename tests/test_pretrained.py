"""Shipped weights (ditnorm/pretrained.py, export.py weights): written from a run, read as a checkpoint,
checked by SHA-256; and the weights committed under res/*/weights/ are the files their SHA256SUMS list."""

import hashlib
from pathlib import Path

import pytest
import torch
from builders import perturb_zero_init, save_model

import export
import sample
from ditnorm import analysis, pretrained
from ditnorm.checkpoint import CheckpointError, load_for_sampling, load_model, read_checkpoint
from ditnorm.files import SUMS, shipped_sums
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
TOY = "ToyDiT-XS/1"


def toy_run(folder, norm="layernorm", steps=(10, 20)):
    """A run folder whose checkpoints hold different raw and EMA weights (train_args of a real run)."""
    for step in steps:
        model = perturb_zero_init(build_model(TOY, norm=norm), seed=step)
        raw = perturb_zero_init(build_model(TOY, norm=norm), seed=step + 1).state_dict()
        path = save_model(model, TOY, folder / "checkpoints" / f"{step:07d}.pt", step,
                          train_args={"seed": 0})
        checkpoint = torch.load(path, weights_only=True)
        torch.save({**checkpoint, "model": raw}, path)
    return folder


def same_weights(a, b):
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_exported_weights_load_as_the_checkpoint_and_the_folder_as_a_run(tmp_path, capsys):
    run = toy_run(tmp_path / "results" / "000-ToyDiT-XS-1-layernorm")
    weights = tmp_path / "weights"
    export.main(["weights", str(run), str(weights), "--steps", "10,20", "--weights", "ema,raw",
                 "--trained-by", "python train_toy.py --seed 0"])
    assert capsys.readouterr().out.count("wrote ") == 2
    shipped = weights / run.name / "checkpoints" / "0000020.safetensors"
    for kind in ("ema", "raw"):
        original, _ = load_model(run / "checkpoints" / "0000020.pt", weights=kind)
        model, config = load_model(shipped, weights=kind)
        assert same_weights(model, original), kind
        assert config["norm"] == "layernorm" and config["model"] == TOY
    assert not same_weights(load_model(shipped, weights="ema")[0], load_model(shipped, weights="raw")[0])
    # the file is read as a checkpoint: config, train_args and step travel in its metadata
    checkpoint = read_checkpoint(shipped)
    assert checkpoint["step"] == 20 and checkpoint["train_args"] == {"seed": 0}
    assert load_for_sampling(shipped)[2] == {"seed": 0}
    # SHA256SUMS in sha256sum's format, README.md with each file's size, digest and provenance line
    sums = (weights / SUMS).read_text().splitlines()
    assert sums == [f"{hashlib.sha256((weights / name).read_bytes()).hexdigest()}  {name}"
                    for name in (f"{run.name}/checkpoints/000{s}.safetensors" for s in ("0010", "0020"))]
    readme = (weights / "README.md").read_text()
    assert f"| {shipped.stat().st_size:,} | ema+raw | F32 |" in readme
    assert "trained by `python train_toy.py --seed 0`; written by `python export.py weights" in readme
    # the weights folder is a run folder to every reader of one
    assert analysis.run_checkpoints(weights / run.name) == {10: shipped.with_name("0000010.safetensors"),
                                                             20: shipped}
    none = toy_run(tmp_path / "results" / "000-ToyDiT-XS-1-none", norm="none")
    export.main(["weights", str(none), str(weights), "--steps", "20", "--trained-by", "python train_toy.py"])
    pair = analysis.find_run_pair(tmp_path / "empty", model=TOY, shipped=weights)
    assert pair == (weights / run.name, weights / none.name)
    out = tmp_path / "samples.npz"
    sample.main(["--ckpt", str(weights / run.name), "--step", "10", "--weights", "raw", "--num-samples", "2",
                 "--num-sampling-steps", "2", "--out", str(out)])
    assert out.is_file()


def test_float16_halves_the_file_and_reads_back_as_float32(tmp_path):
    run = toy_run(tmp_path / "zeros-none-seed0", norm="none", steps=(10,))
    checkpoint = run / "checkpoints" / "0000010.pt"
    paths = {dtype: pretrained.export_weights(checkpoint, tmp_path / dtype, run=run.name, dtype=dtype,
                                              trained_by="t", command="c")
             for dtype in ("float32", "float16")}
    assert paths["float16"].stat().st_size < 0.55 * paths["float32"].stat().st_size
    half, _ = load_model(paths["float16"])
    full, _ = load_model(paths["float32"])
    for a, b in zip(half.state_dict().values(), full.state_dict().values(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b.half().float())


def test_a_preset_run_names_its_training_command(tmp_path):
    from ditnorm.presets import runs
    from ditnorm.trainer import train_run

    name, cfg = runs("tiny", [0])[0]
    run = tmp_path / "tiny" / name
    train_run(dict(cfg, max_steps=2, ckpt_steps="2"), run)
    assert pretrained.training_command(run) == "python experiment.py train --preset tiny --seeds 0"
    assert pretrained.training_command(tmp_path / "other" / name) is None
    out = pretrained.export_weights(analysis.checkpoint_at(run), tmp_path / "w", run=name, trained_by="x",
                                    command="y")
    assert out.name == "0000002.safetensors" and "model" not in read_checkpoint(out)  # the EMA only
    with pytest.raises(CheckpointError, match="lacks its model"):
        load_model(out, weights="raw")


def test_export_refuses_what_it_cannot_ship(tmp_path, capsys):
    run = toy_run(tmp_path / "results" / "000-ToyDiT-XS-1-none", norm="none", steps=(10,))
    for argv, says in ((["--trained-by", "x", "--weights", "ema,best"], "choose from ema, raw"),
                       (["--trained-by", "x", "--steps", "30"], "no checkpoint at step 30"),
                       ([], "cannot tell which command trained")):
        with pytest.raises(SystemExit) as e:
            export.main(["weights", str(run), str(tmp_path / "w"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "w").exists()


def test_a_file_not_matching_its_sha256_is_refused(tmp_path):
    run = toy_run(tmp_path / "zeros-none-seed0", norm="none", steps=(10,))
    path = pretrained.export_weights(run / "checkpoints" / "0000010.pt", tmp_path / "w", run=run.name,
                                     trained_by="t", command="c")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # a flipped bit in the last tensor: still a well-formed safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA-256") as e:
        load_model(path)
    assert "\n" not in str(e.value) and path.name in str(e.value)
    renamed = path.with_name("0000011.safetensors")
    path.rename(renamed)
    with pytest.raises(CheckpointError, match="is not listed in"):
        load_model(renamed)


SHIPPED = sorted(ROOT.glob("res/*/weights"))


def test_the_committed_weights_are_listed_small_and_intact():
    assert SHIPPED, "no res/<preset>/weights/ folder"
    for weights in SHIPPED:
        _, digests = shipped_sums(weights / SUMS)
        files = sorted(p.relative_to(weights).as_posix() for p in weights.rglob("*.safetensors"))
        assert files == sorted(digests), weights
        for name, digest in digests.items():
            data = (weights / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest and len(data) < 3_000_000, name
        assert (weights / "README.md").read_text() == pretrained.readme_text(weights)  # of these files
