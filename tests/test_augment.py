"""Batched distortions: elastic fields (Simard et al. 2003) and their registration."""

import math

import pytest
import torch

from lenet.augment import (
    AUGMENTATIONS,
    AffineAugment,
    ElasticAugment,
    gaussian_blur,
    identity_grid,
    resample,
)
from lenet.config import AUGMENT_CHOICES, resolve_config


def digits(n: int = 16) -> torch.Tensor:
    """Float images with strokes on a background of -0.1, like normalised LeNet-5 inputs."""
    images = torch.full((n, 1, 28, 28), -0.1)
    for k in range(n):
        images[k, 0, 6 + k % 5 : 22, 12 + k % 3 : 15 + k % 3] = 1.175  # a thick vertical bar
        images[k, 0, 6:9, 8:20] = 1.175  # a top bar
    return images


def test_every_augmentation_is_a_config_choice():
    assert set(AUGMENTATIONS) == set(AUGMENT_CHOICES)
    resolve_config("lenet", augment="elastic")
    resolve_config("lenet", augment="affine+elastic")


@pytest.mark.parametrize("name", ["elastic", "affine+elastic"])
def test_distortion_keeps_shape_range_and_background_and_moves_pixels(name):
    augment = AUGMENTATIONS[name]
    images = digits()
    out = augment(images, torch.Generator().manual_seed(0), background=-0.1)
    assert out.shape == images.shape and out.dtype == images.dtype
    # Bilinear sampling of values in [-0.1, 1.175], with -0.1 outside, stays in that range.
    assert out.min() >= -0.1 - 1e-6 and out.max() <= 1.175 + 1e-6
    changed = (out - images).abs() > 0.05
    assert changed.flatten(1).any(1).all()  # every image moved
    assert changed.float().mean() < 0.3  # but stays a distortion of the same picture
    # A blank page stays blank: the background comes in from beyond the border unchanged.
    blank = torch.full((4, 1, 28, 28), -0.1)
    assert torch.allclose(augment(blank, torch.Generator().manual_seed(1), -0.1), blank)


def test_elastic_is_deterministic_for_a_seeded_generator():
    augment, images = ElasticAugment(), digits()
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_displacement_field_is_smooth_and_of_the_intended_size():
    images = torch.zeros(200, 1, 28, 28)
    field = ElasticAugment().displacement(images, torch.Generator().manual_seed(0))
    assert field.shape == (200, 28, 28, 2)
    pixels = field * 14  # grid units to pixels: one pixel is 2 / 28
    size = pixels.norm(dim=-1)
    # Alpha 34 and sigma 4 move a pixel by about 1.6 pixels on average.
    assert 1.0 < size.mean() < 2.5
    # Smooth: neighbouring pixels move almost alike (here by about a sixth of the typical
    # move), unlike unsmoothed noise, whose neighbours are as different as any two pixels.
    step = (pixels[:, 1:] - pixels[:, :-1]).norm(dim=-1).mean()
    assert step < 0.3 * size.mean()
    noise = torch.empty(200, 28, 28, 2).uniform_(-1, 1)
    assert (noise[:, 1:] - noise[:, :-1]).norm(dim=-1).mean() > 0.5 * noise.norm(dim=-1).mean()


def test_gaussian_blur_matches_the_gaussian_formula():
    sigma = 2.0
    delta = torch.zeros(1, 2, 31, 31)
    delta[0, :, 15, 15] = 1.0
    blurred = gaussian_blur(delta, sigma)[0, 0]
    radius = math.ceil(3 * sigma)
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    one_d = torch.exp(-(grid**2) / (2 * sigma**2))
    one_d /= one_d.sum()
    expected = torch.zeros(31, 31)
    expected[15 - radius : 16 + radius, 15 - radius : 16 + radius] = one_d[:, None] * one_d
    torch.testing.assert_close(blurred, expected)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_identity_grid_and_the_affine_grid_refactor():
    images = digits(4)
    # Sampling at the identity grid gives the images back.
    torch.testing.assert_close(resample(images, identity_grid(images), -0.1), images)
    # The affine augmentation is its grid, resampled (what affine+elastic builds on).
    affine = AffineAugment()
    out = affine(images, torch.Generator().manual_seed(3), -0.1)
    grid = affine.grid(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, resample(images, grid, -0.1))
