"""Image resizing and training augmentation, uint8 in and uint8 out.

Images stay uint8 until the GPU side (4x less memory and host->device traffic than float32).
Augmentation draws every random number from an explicit ``np.random.Generator``, so a sample's
augmentation depends only on how that generator was seeded, not on worker count or order.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

ASPECT_RANGE = (3 / 4, 4 / 3)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma weights


def resize(img: np.ndarray, size: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear; ``box`` (x0, y0, x1, y1) crops first."""
    if box is None and img.shape[0] == size and img.shape[1] == size:
        return img
    out = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out)


def to_chw(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) uint8, contiguous."""
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float]
) -> tuple[float, float, float, float]:
    """A random crop (x0, y0, x1, y1) covering ``scale`` of the area, aspect ratio in ASPECT_RANGE.

    Like torchvision's RandomResizedCrop, with a fallback to the full image after 10 misses.
    """
    area = height * width
    log_lo, log_hi = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    return (0.0, 0.0, float(width), float(height))


def color_jitter(chw: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast and saturation factors in [1 - strength, 1 + strength].

    chw: (3, H, W) uint8 -> same shape, uint8. Works on channel planes (contiguous, so several
    times faster than on interleaved HWC); brightness and contrast are one per-value affine map,
    applied as a 256-entry lookup table; the contrast pivot is the luma mean of every 2nd pixel.
    """
    if strength <= 0:
        return chw
    # Python floats keep the arithmetic in float32 (numpy float64 scalars would promote it).
    # Factors in [max(0, 1 - s), 1 + s], as torchvision's ColorJitter: a negative one inverts the image.
    b, c, s = (float(v) for v in rng.uniform(max(0.0, 1 - strength), 1 + strength, size=3))
    mean = float(chw[:, ::2, ::2].reshape(3, -1).mean(1) @ LUMA) * b  # luma mean after brightness
    lut = np.clip((np.arange(256, dtype=np.float32) * b - mean) * c + mean, 0, 255)
    x = np.take(lut, chw)  # (3, H, W) float32
    gray = x[0] * LUMA[0] + x[1] * LUMA[1] + x[2] * LUMA[2]
    x -= gray
    x *= s
    x += gray + 0.5  # + 0.5: round to nearest on the uint8 cast
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def augment(
    img: np.ndarray, size: int, rng: np.random.Generator, crop_scale: tuple[float, float], jitter: float
) -> np.ndarray:
    """Random resized crop to (size, size), then colour jitter. (H, W, 3) uint8 -> (3, size, size) uint8."""
    box = crop_box(img.shape[0], img.shape[1], rng, crop_scale)
    return color_jitter(to_chw(resize(img, size, box)), rng, jitter)
