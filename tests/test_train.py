"""train.py on the user's own images: an RGB folder trains, the model fits the data, sample.py draws it."""

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
import train_toy
from ditnorm.checkpoint import load_model, read_checkpoint, save_checkpoint
from ditnorm.trainer import IMAGE_DEFAULTS, parse_args

RGB = dict(classes=("apple", "boat", "cloud"), sizes=((40, 30), (17, 25), (64, 64)))
TRAIN = ["--model", "MnistDiT-XS/4", "--max-steps", "4", "--global-batch-size", "8", "--log-every", "2"]


def rgb_folder(root, per_class=4, seed=0):
    """A folder of class subfolders with RGB images of mixed sizes, each class tinted its own colour."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(RGB["classes"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = RGB["sizes"][i % 3]
            pixels = rng.integers(0, 128, (h, w, 3), dtype=np.uint8)
            pixels[..., k] += 127
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """A 4-step run of train.py --data-path (alone) on a 3-class RGB folder at 16x16."""
    root = tmp_path_factory.mktemp("rgb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main([*TRAIN, "--data-path", str(rgb_folder(root / "pictures")), "--image-size", "16",
                    "--results-dir", str(root / "results")], defaults=IMAGE_DEFAULTS, prog="train.py")
    finally:
        torch.set_num_threads(threads)
    (run,) = (root / "results").iterdir()
    return run


def test_an_rgb_folder_trains_a_model_built_to_fit_it(rgb_run):
    ckpt = read_checkpoint(rgb_run / "checkpoints" / "0000004.pt")
    config, args = ckpt["config"], ckpt["train_args"]
    assert (config["in_channels"], config["input_size"], config["num_classes"]) == (3, 16, 3)
    assert config["patch_size"] == 4 and args["data"] == "folder" and args["image_size"] == 16
    model, loaded = load_model(rgb_run / "checkpoints" / "0000004.pt")  # rebuilt from the checkpoint alone
    assert loaded["in_channels"] == 3 and model.pos_embed.shape == (1, 16, 64)  # (16 / 4)^2 tokens
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sample_draws_a_grid_of_the_rgb_run(rgb_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    sample.main(["--ckpt", str(rgb_run), "--per-class", "2", "--num-sampling-steps", "5", "--seed", "3",
                 "--cfg-scale", "2", "--out", str(out)])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * 18 + 2, 2 * 18 + 2, 3)  # a row per class, 2 samples in each, 16x16 images
    saved = np.load(tmp_path / "grid.npz")
    samples = saved["samples"]
    assert samples.shape == (6, 3, 16, 16) and saved["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert np.abs(samples).max() <= 1 and samples.std() > 0.05  # clipped pixels, not a constant image
    assert float(saved["cfg_scale"]) == 2 and int(saved["seed"]) == 3
    # the grid is the saved samples, as the official save_image maps [-1, 1] to 0-255
    first = np.clip((samples[0] + 1) / 2 * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(grid[2:18, 2:18], first)
    assert "3 classes x 2 samples of 3x16x16" in capsys.readouterr().out
    again = tmp_path / "again.png"  # the seed fixes the samples
    sample.main(["--ckpt", str(rgb_run), "--per-class", "2", "--num-sampling-steps", "5", "--seed", "3",
                 "--cfg-scale", "2", "--out", str(again)])
    assert np.array_equal(np.load(tmp_path / "again.npz")["samples"], samples)


def test_a_grey_mnist_model_samples_its_digit_rows(tmp_path):
    from builders import perturb_zero_init, save_model

    from models import build_model

    model = perturb_zero_init(build_model("MnistDiT-XS/4", depth=1))
    ckpt = save_model(model, "MnistDiT-XS/4", tmp_path / "run" / "checkpoints" / "0000010.pt", 10,
                      train_args={"data": "mnist"})
    sample.main(["--ckpt", str(ckpt.parent.parent), "--per-class", "1", "--num-sampling-steps", "2",
                 "--cfg-scale", "1", "--class-labels", "7", "3", "--out", str(tmp_path / "d.png")])
    assert np.asarray(Image.open(tmp_path / "d.png")).shape == (2 * 30 + 2, 30 + 2, 3)  # grey shown as RGB
    assert np.load(tmp_path / "d.npz")["labels"].tolist() == [7, 3]


@pytest.mark.parametrize("flags, message", [
    (["--data", "mnist", "--data-path", "{pictures}"], "--data mnist reads no folder; drop --data-path"),
    (["--data", "folder"], "--data folder reads the images of --data-path; pass --data-path DIR alone"),
    (["--image-size", "32"], "--image-size sizes the images of --data-path; the offline MNIST is 28x28"),
    (["--data-path", "{pictures}", "--image-size", "18"],
     "MnistDiT-XS/4 cuts 4x4 patches, so its images need a side that is a multiple of 4, not 18; pass "
     "--image-size 16 or 20"),
    (["--data-path", "{pictures}/apple/0.png"], "is not a folder; pass a folder with one subfolder per "
     "class"),
    (["--data-path", "{bomb}"], "huge.png is too large for PIL to read safely"),
    (["--model", "ToyDiT/1"], "argument --model: invalid choice: 'ToyDiT/1'"),
    (["--data", "zeros"], "argument --data: invalid choice: 'zeros'"),
    (["--preset", "cpu"], "unrecognized arguments: --preset cpu"),
])
def test_bad_image_input_is_one_line_and_leaves_no_run(tmp_path, capsys, monkeypatch, flags, message):
    rgb_folder(tmp_path / "pictures", per_class=1)
    (tmp_path / "bomb" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((60, 60), dtype=np.uint8)).save(tmp_path / "bomb" / "a" / "huge.png")
    if "{bomb}" in flags:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's guard, as a 15000x15000 file meets it
    flags = [f.format(pictures=tmp_path / "pictures", bomb=tmp_path / "bomb") for f in flags]
    with pytest.raises(SystemExit) as e:
        train.main([*TRAIN, *flags, "--results-dir", str(tmp_path / "results")], defaults=IMAGE_DEFAULTS,
                   prog="train.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "results").exists()


def test_each_trainer_shows_its_own_models_data_and_defaults(capsys):
    for script, kwargs in ((train, dict(defaults=IMAGE_DEFAULTS, prog="train.py")), (train_toy, {})):
        with pytest.raises(SystemExit):
            script.main(["--help"], description=script.__doc__, **kwargs)
    image_help, toy_help = capsys.readouterr().out.split("usage: train_toy.py")
    assert "MnistDiT-S/4" in image_help and "ToyDiT" not in image_help and "--preset" not in image_help
    options = image_help.split("options:")[1]
    assert "(default: 1000)" in options.split("--ckpt-every")[1].split("--log-every")[0]
    assert "zeros" not in image_help and "CIFAR" not in image_help and "--image-size" in image_help
    assert "MnistDiT" not in toy_help and "{mnist,folder}" not in toy_help and "--data-path" not in toy_help
    assert "(default: 10000,50000)" in toy_help
    assert all("--recipe {cpu,cpu-short,mnist,paper,tiny}" in text for text in (image_help, toy_help))
    _, args = parse_args([], IMAGE_DEFAULTS, "train.py")
    assert args.preset is None and args.data_path is None  # flags it does not show are never set


def test_a_resumed_run_refuses_other_data(rgb_run, tmp_path, capsys):
    grey = tmp_path / "grey" / "a"
    grey.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(grey / "0.png")
    checkpoint = tmp_path / "copy.pt"
    save_checkpoint(read_checkpoint(rgb_run / "checkpoints" / "0000004.pt"), checkpoint)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(checkpoint), "--data-path", str(grey.parent), "--max-steps", "5",
                    "--results-dir", str(tmp_path / "results")], defaults=IMAGE_DEFAULTS, prog="train.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "images are 1x16x16 but the checkpoint's model takes 3x16x16" in err[0]
    assert not (tmp_path / "results").exists()
