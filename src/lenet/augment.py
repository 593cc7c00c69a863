"""Random distortions applied to whole batches as tensor operations, on the batch's device.

Working on the batch (one affine grid, one resampling) instead of per image keeps
augmentation a small fraction of a training step, on the CPU as on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineAugment:
    """Random rotation, scaling, shear and translation, as handwriting varies."""

    degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear_degrees: float = 8.0
    translate_pixels: float = 2.0

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, background: float = 0.0
    ) -> torch.Tensor:
        """Distort float images (N, C, H, W); ``background`` is the value of an empty pixel."""
        n, _, height, width = images.shape

        def uniform(low: float, high: float) -> torch.Tensor:
            # Drawn on the CPU generator so the sequence is the same on every device.
            return torch.empty(n).uniform_(low, high, generator=generator)

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180)
        shear = uniform(-self.shear_degrees, self.shear_degrees) * (math.pi / 180)
        scale = uniform(*self.scale)
        # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
        tx = uniform(-self.translate_pixels, self.translate_pixels) * (2.0 / width)
        ty = uniform(-self.translate_pixels, self.translate_pixels) * (2.0 / height)
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        # Inverse map (output -> input): rotation times shear, divided by scale.
        theta = torch.stack(
            [
                torch.stack([cos, -sin + cos * tan, tx], dim=1),
                torch.stack([sin, cos + sin * tan, ty], dim=1),
            ],
            dim=1,
        ) / scale.view(n, 1, 1)
        theta[:, :, 2] *= scale.view(n, 1)  # translation is not scaled
        theta = theta.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        shifted = images - background  # grid_sample fills outside with zeros
        out = F.grid_sample(
            shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return out.add_(background)


AUGMENTATIONS = {"none": None, "affine": AffineAugment()}
