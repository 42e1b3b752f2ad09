"""Files that are not what an entry point reads (issue 26): every reader answers them in one line.

Each kind of file is fed to each reader of a checkpoint, a run folder or a diffusers folder: train_toy.py
--resume, sample.py --ckpt, export.py diffusers, probe.py, load_model and analysis.find_run_pair. Each must
give one line naming the file, a non-zero exit (a CheckpointError for the library functions), no traceback,
and write nothing.
"""

import json
import pickle
import random
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from builders import perturb_zero_init, save_model
from safetensors.torch import save_file

import export
import probe
import sample
import train_toy
from ditnorm import analysis
from ditnorm.checkpoint import FORMAT, CheckpointError, load_model, save_checkpoint
from ditnorm.pretrained import export_weights
from models import build_model

TOY = "ToyDiT-XS/1"


def resumable(model, name=TOY, state_dict=None):
    """A checkpoint with every part train_toy.py needs to resume (the weights: state_dict, or the model's)."""
    weights = model.state_dict() if state_dict is None else state_dict
    return {"format": FORMAT, "config": {"model": name, **model.config}, "model": weights, "ema": weights,
            "opt": {}, "step": 5, "train_args": {}, "rng": {"torch": torch.get_rng_state()}}


def zip_with(path, members):
    """A zip archive at path holding members {name: bytes}."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def make_files(folder):
    """{kind: path} of the bad inputs, written into folder."""
    folder.mkdir()
    toy = perturb_zero_init(build_model(TOY, norm="layernorm"))
    good = save_model(toy, TOY, folder / "good.pt")  # only a source for the damaged ones below
    data = good.read_bytes()
    noise = random.Random(0).randbytes(4096)
    files = {
        "text": b"hello world\n",
        "noise": b"\x01" + noise,
        "noise after a pickle header": b"\x80\x02" + noise,
        "noise after a zip header": b"PK" + noise,
        "empty": b"",
        "truncated checkpoint": data[: len(data) // 2],
        "json": json.dumps({"format": FORMAT, "config": {}}).encode(),
        "plain pickle": pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=4),
        "pickle of an object": pickle.dumps(Path("x"), protocol=4),
    }
    paths = {}
    for i, (kind, content) in enumerate(files.items()):
        paths[kind] = folder / f"{i:02d}.pt"
        paths[kind].write_bytes(content)
    paths["zip of other content"] = folder / "zip.pt"
    zip_with(paths["zip of other content"], {"notes.txt": b"hello world\n"})
    with zipfile.ZipFile(good) as z:  # a checkpoint whose pickle record is text
        members = {n: (b"hello world\n" if n.endswith("data.pkl") else z.read(n)) for n in z.namelist()}
    paths["checkpoint with a broken record"] = folder / "broken_record.pt"
    zip_with(paths["checkpoint with a broken record"], members)
    for kind, obj in {"torch.save of a list": [1, 2], "torch.save of a tensor": torch.ones(3),
                      "torch.save of a foreign dict": {"weights": torch.ones(3)}}.items():
        paths[kind] = folder / f"{kind.split()[-1]}.pt"
        torch.save(obj, paths[kind])
    bigger = build_model(TOY, norm="layernorm", hidden_size=64, num_heads=2)
    paths["checkpoint of another model"] = folder / "other_model.pt"  # config says XS, weights are wider
    torch.save(resumable(toy, state_dict=bigger.state_dict()), paths["checkpoint of another model"])
    config = {**resumable(toy)["config"], "depth": "2"}
    paths["checkpoint with a garbled config"] = folder / "garbled_config.pt"
    torch.save({**resumable(toy), "config": config}, paths["checkpoint with a garbled config"])
    paths["checkpoint with non-tensor weights"] = folder / "non_tensor.pt"
    torch.save({**resumable(toy), "model": {"w": 1}, "ema": {"w": 1}},
               paths["checkpoint with non-tensor weights"])
    # Every entry point below asks for a layernorm model: a good norm="none" checkpoint does not fit it.
    none = perturb_zero_init(build_model(TOY, norm="none"))
    paths["checkpoint of a none-norm model"] = folder / "none.pt"
    save_checkpoint(resumable(none), paths["checkpoint of a none-norm model"])
    paths["empty folder"] = folder / "empty_folder"
    paths["empty folder"].mkdir()
    paths["run folder with a text checkpoint"] = folder / "000-run"
    (folder / "000-run" / "checkpoints").mkdir(parents=True)
    (folder / "000-run" / "checkpoints" / "0000010.pt").write_bytes(b"hello world\n")
    paths["diffusers folder with a text config"] = folder / "diffusers"
    paths["diffusers folder with a text config"].mkdir()
    (folder / "diffusers" / "config.json").write_text("hello world\n")
    paths["diffusers folder with a list for its config"] = folder / "diffusers_list"
    paths["diffusers folder with a list for its config"].mkdir()
    (folder / "diffusers_list" / "config.json").write_text("[1, 2]\n")
    # Shipped weights (pretrained.py): damaged, foreign, or not the file its SHA256SUMS lists
    shipped = export_weights(good, folder / "weights", run="run", trained_by="t", command="c")
    data = shipped.read_bytes()
    paths["truncated shipped weights"] = folder / "truncated.safetensors"  # outside a weights folder
    paths["truncated shipped weights"].write_bytes(data[: len(data) // 2])
    paths["shipped weights not matching their SHA-256"] = shipped
    shipped.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    paths["foreign safetensors"] = folder / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, paths["foreign safetensors"])
    good.unlink()
    return paths


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("bad") / "inputs")


@pytest.fixture(scope="module")
def none_run(tmp_path_factory):
    """A good run folder of a norm="none" toy model: the partner of a bad run in find_run_pair."""
    run = tmp_path_factory.mktemp("runs") / "000-ToyDiT-XS-1-none"
    save_model(perturb_zero_init(build_model(TOY, norm="none")), TOY, run / "checkpoints" / "0000010.pt", 10)
    return run


def tree(folder):
    """Every path under folder with its size (what an entry point might have written)."""
    return {str(p.relative_to(folder)): p.stat().st_size if p.is_file() else None for p in folder.rglob("*")}


def call_script(main, argv):
    """(exit status, stderr's lines) of a script's main(argv) that must exit; SystemExit("...") prints its
    text to stderr as Python does."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    return (1, [code]) if isinstance(code, str) else (code, None)


ENTRY_POINTS = {
    "train_toy.py --resume": (train_toy.main, lambda f, out: ["--resume", f, "--norm", "layernorm",
                                                             "--results-dir", str(out / "res"),
                                                             "--max-steps", "9"]),
    "sample.py --ckpt": (sample.main, lambda f, out: ["--ckpt", f, "--norm", "layernorm",
                                                      "--num-samples", "2", "--num-sampling-steps", "2",
                                                      "--out", str(out / "s.npz")]),
    "export.py diffusers": (export.main, lambda f, out: ["diffusers", f, str(out / "exported")]),
    "probe.py": (probe.main, lambda f, out: [f, "--device", "cpu", "--out", str(out / "probe.md")]),
}
KINDS = ["text", "noise", "noise after a pickle header", "noise after a zip header", "empty",
         "truncated checkpoint", "json", "plain pickle", "pickle of an object", "zip of other content",
         "checkpoint with a broken record", "torch.save of a list", "torch.save of a tensor",
         "torch.save of a foreign dict", "checkpoint of another model", "checkpoint with a garbled config",
         "checkpoint with non-tensor weights", "checkpoint of a none-norm model", "empty folder",
         "run folder with a text checkpoint", "diffusers folder with a text config",
         "diffusers folder with a list for its config", "truncated shipped weights",
         "shipped weights not matching their SHA-256", "foreign safetensors"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_bad_file_is_one_line_on_every_entry_point(bad_files, tmp_path, capsys, entry, kind):
    main, argv = ENTRY_POINTS[entry]
    path = bad_files[kind]
    inputs = tree(path.parent)
    with warnings.catch_warnings(record=True) as warned:  # a warning would be more lines on stderr
        warnings.simplefilter("always")
        status, lines = call_script(main, argv(str(path), tmp_path))
    assert not warned, [str(w.message)[:200] for w in warned]
    captured = capsys.readouterr()
    lines = lines if lines is not None else captured.err.strip().splitlines()
    assert status != 0 and len(lines) == 1, (status, captured.err)
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert path.name in lines[0] or entry == "train_toy.py --resume" and kind.startswith("run folder"), lines
    assert not list(tmp_path.iterdir()), "an output was written"
    assert tree(path.parent) == inputs, "an input was changed"


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_raises_one_checkpoint_error(bad_files, kind):
    with pytest.raises(CheckpointError) as e:
        load_model(bad_files[kind], norm="layernorm")
    assert "\n" not in str(e.value) and bad_files[kind].name in str(e.value), str(e.value)


# find_run_pair reads a run's setup (config and train_args) from its last checkpoint, not its weights.
UNREADABLE = KINDS[:KINDS.index("checkpoint of another model")] + ["truncated shipped weights",
                                                                   "foreign safetensors"]


@pytest.mark.parametrize("kind", UNREADABLE)
def test_find_run_pair_raises_one_checkpoint_error(bad_files, none_run, tmp_path, kind):
    run = tmp_path / "000-ToyDiT-XS-1-layernorm"
    (run / "checkpoints").mkdir(parents=True)
    name = f"0000010{bad_files[kind].suffix or '.pt'}"
    (run / "checkpoints" / name).write_bytes(bad_files[kind].read_bytes())
    with pytest.raises(CheckpointError) as e:
        analysis.find_run_pair(layernorm_run=run, none_run=none_run)
    assert "\n" not in str(e.value) and name in str(e.value), str(e.value)


def test_a_bug_inside_the_loader_still_shows_its_traceback(bad_files, monkeypatch):
    """Only the parse of the file is caught: an error of this repository's code after it is not reworded."""
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("ditnorm.checkpoint._check_keys", broken)
    with pytest.raises(KeyError, match="a bug"):
        load_model(bad_files["checkpoint of another model"])


# Issue 37: the image trainer, the runner and the report meet more files a user brings.


def png_claiming(path, width, height):
    """A PNG whose header says width x height (a 1x1 image with its IHDR rewritten, its CRC fixed): what a
    huge image is to PIL, which refuses it from the header before decoding a pixel."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IHDR")
    data[start + 4:start + 12] = struct.pack(">II", width, height)
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 17])))
    path.write_bytes(bytes(data))
    return path


def test_a_15000_pixel_square_image_is_one_line(tmp_path, capsys):
    import train
    from ditnorm.trainer import IMAGE_DEFAULTS

    (tmp_path / "pictures" / "cats").mkdir(parents=True)
    png_claiming(tmp_path / "pictures" / "cats" / "huge.png", 15000, 15000)
    with pytest.raises(SystemExit) as e:
        train.main(["--data-path", str(tmp_path / "pictures"), "--model", "MnistDiT-XS/4", "--max-steps", "1",
                    "--results-dir", str(tmp_path / "results")], defaults=IMAGE_DEFAULTS, prog="train.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"train.py: error: image {tmp_path / 'pictures' / 'cats' / 'huge.png'} is too "
                             "large for PIL to read safely (Image size (225000000 pixels) exceeds limit")
    assert err[0].endswith("shrink or remove it") and not (tmp_path / "results").exists()


def test_a_file_as_the_runners_results_dir_is_one_line(tmp_path, capsys):
    import experiment

    (tmp_path / "afile").write_text("a file, not a folder\n")
    with pytest.raises(SystemExit) as e:
        experiment.main(["train", "--preset", "tiny", "--seeds", "0", "--results-dir",
                         str(tmp_path / "afile")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"experiment.py: error: --results-dir {tmp_path / 'afile'}: "
                                         f"{tmp_path / 'afile'} is a file, not a folder; pass a folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


ERRORS_CSV = ("data,measure,norm,seed,step,weights,mean,median,p99,max,nonfinite,ks_c\r\n"
              "zeros,abs_x,layernorm,0,10,ema,117.1,88.1,375.1,508.7,0,nan\r\n"
              "zeros,abs_x,layernorm,0,20,ema,17.1,8.1,75.1,108.7,0,nan\r\n")


@pytest.mark.parametrize("content, reason", [
    (ERRORS_CSV[:-12], "{path}: line 3 has fewer cells than the header"),  # a truncated last line
    (ERRORS_CSV.replace("88.1", "eighty"), "{path}: could not convert string to float: 'eighty'"),
    ("", "{path} is empty (not even a header)"),
    (ERRORS_CSV.replace("layernorm,0,20", "batchnorm,0,20"),
     "{path}: line 3 has norm 'batchnorm', which this preset does not measure"),
])
def test_a_damaged_errors_csv_ends_the_report_in_one_line(tmp_path, capsys, content, reason):
    import experiment

    run = tmp_path / "tiny" / "res" / "runs" / "zeros-layernorm-seed0"
    run.mkdir(parents=True)
    (run / "errors.csv").write_text(content, newline="")
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as e:
        experiment.main(["report", "--preset", "tiny", "--seeds", "0", "--results-dir", str(tmp_path)])
    said = reason.format(path=run / "errors.csv", record=tmp_path / "tiny" / "res")
    assert e.value.code == (f"experiment.py: error: {said}; delete it and run experiment.py measure again "
                            "to rewrite it")
    assert tree(tmp_path) == before, "the report wrote something"


def test_a_nan_image_checkpoint_is_refused_for_its_weights(tmp_path, capsys):
    model = perturb_zero_init(build_model("MnistDiT-XS/4", depth=1))
    nan = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    torch.save({**resumable(model, name="MnistDiT-XS/4"), "ema": nan, "train_args": {"data": "mnist"}},
               tmp_path / "nan.pt")  # save_checkpoint refuses to write it, as the trainer does
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "out" / "grid.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"sample.py: error: {tmp_path / 'nan.pt'} holds non-finite ema weights (")
    assert err[0].endswith("a diverged run); pass an earlier checkpoint") and not (tmp_path / "out").exists()
