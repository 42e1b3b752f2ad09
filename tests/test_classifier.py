"""ditnorm/classifier.py: the Fréchet distance against closed forms, and a classifier that learns."""

import numpy as np
import torch

from ditnorm.classifier import (
    embed,
    frechet_distance,
    gaussian_fit,
    load_classifier,
    save_classifier,
    train_classifier,
)


def test_frechet_distance_of_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    fit = gaussian_fit(a)
    assert abs(frechet_distance(fit, fit)) < 1e-9
    # Diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2.
    fit_a = (np.array([0.0, 1.0]), np.diag([1.0, 4.0]))
    fit_b = (np.array([3.0, 1.0]), np.diag([9.0, 1.0]))
    assert np.isclose(frechet_distance(fit_a, fit_b), 9.0 + (1 - 3) ** 2 + (2 - 1) ** 2)
    # Not diagonal: rotate both by the same orthogonal matrix, which changes nothing.
    q, _ = np.linalg.qr(rng.standard_normal((2, 2)))
    rotated = [(q @ m, q @ c @ q.T) for m, c in (fit_a, fit_b)]
    assert np.isclose(frechet_distance(*rotated), 14.0)


def test_a_classifier_learns_separable_images_and_survives_a_round_trip(tmp_path):
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    images = -torch.ones(60, 1, 8, 8)
    for k in range(3):  # class k lights rows 2k..2k+1
        images[labels == k, :, 2 * k:2 * k + 2] = 1.0
    images += 0.1 * torch.randn_like(images)
    net = train_classifier(images, labels, epochs=20, batch=16)
    features, predicted = embed(net, images)
    assert features.shape == (60, 128) and (predicted == labels).all()
    save_classifier(net, tmp_path / "c.pt")
    again = load_classifier(tmp_path / "c.pt")
    assert torch.equal(embed(again, images)[0], features)
    # The same seed gives the same weights.
    assert torch.equal(embed(train_classifier(images, labels, epochs=20, batch=16), images)[0], features)
