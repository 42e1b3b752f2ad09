"""A small digit classifier trained here, and the Fréchet distance of its 128-d features (not Inception FID,
which cannot be downloaded here and does not know 28x28 digits), with class accuracy."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES = 128


class DigitNet(nn.Module):
    """Two conv layers and two linear ones; features() is the 128-d input of the last layer."""

    def __init__(self, in_channels=1, num_classes=10, size=28):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, size=size)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * (size // 4) ** 2, FEATURES)
        self.fc2 = nn.Linear(FEATURES, num_classes)

    def features(self, x):
        """x (N, C, S, S) in [-1, 1] -> (N, 128)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 16, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 32, S/4, S/4)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))  # (N, classes)


def train_classifier(images, labels, *, epochs=4, batch=64, lr=1e-3, seed=0):
    """DigitNet trained on images (N, C, S, S) in [-1, 1] with Adam, from seed alone (one thread: the same
    weights wherever the same float arithmetic runs)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitNet(images.shape[1], int(labels.max()) + 1, images.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            rows = order[start:start + batch]
            loss = F.cross_entropy(net(images[rows]), labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def save_classifier(net, path):
    torch.save({"config": net.config, "state_dict": net.state_dict()}, path)


def load_classifier(path):
    """The DigitNet saved by save_classifier (weights_only: plain tensors and numbers)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = DigitNet(**saved["config"])
    net.load_state_dict(saved["state_dict"])
    return net.eval().requires_grad_(False)


@torch.no_grad()
def embed(net, images, batch=1000):
    """(features (N, 128) float64, predicted classes (N,)) of images in [-1, 1]."""
    feats, preds = [], []
    for start in range(0, len(images), batch):
        f = net.features(images[start:start + batch].float())
        feats.append(f.double())
        preds.append(net.fc2(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def gaussian_fit(features):
    """(mean (D,), covariance (D, D)) of features (N, D), float64 numpy."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(fit_a, fit_b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two Gaussian fits (the symmetric
    form, whose trace equals (S_a S_b)^1/2's: no complex round-off)."""
    (mu_a, cov_a), (mu_b, cov_b) = fit_a, fit_b
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
