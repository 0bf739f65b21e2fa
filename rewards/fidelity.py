"""Fidelity reward (beyond the paper): does the final image agree with the low-quality input, and with HR if known?

The paper's rewards are all no-reference, and the method is among the weakest on PSNR/SSIM. This reward adds:

* **LR consistency**: the final image, downscaled to the LR size, should reproduce the LR input. Downscaling uses
  PIL's bicubic filter (``Image.resize(size, Image.Resampling.BICUBIC)``), which widens its kernel by the scale
  factor when shrinking, i.e. it is anti-aliased (like MATLAB's ``imresize``), not a point-sampled bicubic.
* **HR fidelity**, when the sample has an ``hr_image``: the final image against HR (HR bicubic-resized to the final
  image's size if they differ).

Each comparison is PSNR or SSIM on RGB in [0, 1], mapped to [0, 1]: ``min(PSNR, psnr_max) / psnr_max`` (identical
images have infinite PSNR and score 1.0) or ``max(SSIM, 0)``. Everything is computed in torch; nothing downloads.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlcot_grpo.vlcot import STAGES

from .base import Reward, column, log_metric, mean, stage_images

COMPARISONS = ("psnr", "ssim")


def bicubic_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``size`` = (width, height) with PIL's anti-aliased bicubic filter (RGB)."""
    image = image.convert("RGB")
    return image if image.size == tuple(size) else image.resize(tuple(size), Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> ``(3, H, W)`` float64 in [0, 1] (float64 so that near-identical images still compare exactly)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]; ``inf`` when identical."""
    mse = float(torch.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al., 2004) of two ``(3, H, W)`` images in [0, 1], averaged over channels.

    Gaussian window of ``window`` pixels (shrunk to the image for images smaller than 11 px), no padding.
    """
    size = min(window, a.shape[-1], a.shape[-2])
    if size % 2 == 0:
        size -= 1  # the window needs a centre pixel
    coords = torch.arange(size, dtype=a.dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[0], 1, size, size)

    def blur(x):
        return F.conv2d(x[None], kernel, groups=a.shape[0])[0]

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


class FidelityReward(Reward):
    """Weighted mean of LR consistency and (when ``hr_image`` is present) HR fidelity of a decoded image, in [0, 1].

    ``None`` when the image is missing, or when no comparison applies (no LR image and no HR image).

    Args:
        lr_weight: weight of LR consistency (final image downscaled to the LR size vs ``lr_image``).
        hr_weight: weight of HR fidelity (final image vs ``hr_image``); ``None`` = 1.0 for samples that have an HR
            image (and 0 for those that do not). Set 0.0 to ignore HR even when present.
        metric: ``"psnr"`` or ``"ssim"``.
        psnr_max: PSNR (dB) that earns the full score; ``min(PSNR, psnr_max) / psnr_max``. The default, 50 dB (an
            RMS error under 1/255), saturates only for near-exact LR consistency, so small errors still cost.
        lr_size: compare at this size (an int, or ``(height, width)``) instead of the ``lr_image``'s own size: both
            the final image and ``lr_image`` are bicubic-resized to it. Use it when the LR column was already
            enlarged to the model's input canvas (the paper feeds LR resized to 512x512); set it to the true LR size,
            e.g. 128 for x4.
        image: which decoded image to score: ``"final"`` (default), ``"middle"`` or ``"rough"``.
    """

    name = "fidelity"

    def __init__(
        self,
        lr_weight: float = 1.0,
        hr_weight: float | None = None,
        metric: str = "psnr",
        psnr_max: float = 50.0,
        lr_size: int | tuple[int, int] | None = None,
        image: str = "final",
    ) -> None:
        super().__init__()
        if metric not in COMPARISONS:
            raise ValueError(f"FidelityReward metric={metric!r}; choose one of {COMPARISONS}")
        if lr_weight < 0 or (hr_weight is not None and hr_weight < 0):
            raise ValueError(f"FidelityReward weights must be >= 0, got lr_weight={lr_weight}, hr_weight={hr_weight}")
        if psnr_max <= 0:
            raise ValueError(f"FidelityReward psnr_max={psnr_max} must be > 0")
        if image not in STAGES:
            raise ValueError(f"FidelityReward image={image!r}; choose one of {STAGES}")
        self.lr_weight = float(lr_weight)
        self.hr_weight = None if hr_weight is None else float(hr_weight)
        self.metric = metric
        self.psnr_max = float(psnr_max)
        self.lr_size = (lr_size, lr_size) if isinstance(lr_size, int) else (tuple(lr_size) if lr_size else None)
        self.image = image

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        n = len(completions)
        images = [stages[self.image] for stages in stage_images(kwargs, n)]
        lr_scores, hr_scores, scores = [], [], []
        for image, lr, hr in zip(images, column(kwargs, "lr_image", n), column(kwargs, "hr_image", n)):
            lr_score = self.lr_consistency(image, lr) if image is not None and lr is not None else None
            hr_score = self.hr_fidelity(image, hr) if image is not None and hr is not None else None
            lr_scores.append(lr_score)
            hr_scores.append(hr_score)
            scores.append(self.combine(lr_score, hr_score))
        for part, values in (("lr", lr_scores), ("hr", hr_scores)):
            if mean(values) is not None:
                log_metric(kwargs, f"fidelity/{part}_{self.metric}", mean(values))
        return scores

    def lr_consistency(self, image: Image.Image, lr: Image.Image) -> float:
        """Score of ``image`` downscaled to the LR size against ``lr``."""
        if self.lr_size is not None:
            height, width = self.lr_size
            size = (width, height)
            lr = bicubic_resize(lr, size)
        else:
            size = lr.size
        return self.compare(bicubic_resize(image, size), lr)

    def hr_fidelity(self, image: Image.Image, hr: Image.Image) -> float:
        """Score of ``image`` against ``hr`` brought to the image's size."""
        return self.compare(image, bicubic_resize(hr, image.size))

    def compare(self, a: Image.Image, b: Image.Image) -> float:
        x, y = to_tensor(a), to_tensor(b)
        if self.metric == "ssim":
            return min(1.0, max(0.0, ssim(x, y)))
        return min(psnr(x, y), self.psnr_max) / self.psnr_max

    def combine(self, lr_score: float | None, hr_score: float | None) -> float | None:
        parts = []
        if lr_score is not None:
            parts.append((self.lr_weight, lr_score))
        if hr_score is not None:
            parts.append((1.0 if self.hr_weight is None else self.hr_weight, hr_score))
        total_weight = sum(w for w, _ in parts)
        if total_weight <= 0:
            return None
        return sum(w * s for w, s in parts) / total_weight
