"""Real-ESRGAN style second-order degradation, with every random choice written down.

The degradation reward compares the levels a model *says* it sees with the levels that were really applied, so
the pipeline that makes low-resolution (LR) inputs must record its parameters. This module has three layers:

1. **Ops** that take every parameter explicitly (no randomness inside except a noise field drawn from an
   explicit seed): :func:`make_kernel` and its kernel families, :func:`blur`, :func:`resize`,
   :func:`add_gaussian_noise`, :func:`add_poisson_noise`, :func:`jpeg_compress`.
2. **A sampler**, :func:`sample_degradation`, that draws one full :class:`DegradationRecord` from the ranges of a
   :class:`DegradationConfig` (defaults: the Real-ESRGAN x4plus training options).
3. **An applier**, :func:`apply_degradation`, that replays a record on a high-resolution (HR) image. The same
   record always gives byte-identical output.

The pipeline (Real-ESRGAN's "second-order" model)::

    stage 1:  blur -> resize (up / down / keep) -> noise (Gaussian or Poisson) -> JPEG
    stage 2:  blur (probability 0.8) -> resize relative to the LR size -> noise
    final:    [resize to the LR size + sinc filter (probability 0.8)] and [JPEG], in a random order
    output:   optional resize of the LR image to ``output_size`` (e.g. the model's input canvas)

Images travel through the pipeline as float32 arrays in [0, 1], shape (H, W, 3), RGB.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np
from PIL import Image
from scipy.special import gammaln, j1

# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------

#: Blur kernel families of the Real-ESRGAN mix ("iso" = isotropic, "aniso" = anisotropic), plus the 2-D sinc.
KERNEL_KINDS: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
    "sinc",
)
#: Interpolation modes, named as in ``torch.nn.functional.interpolate``, mapped to their OpenCV flags.
#: "area" is OpenCV's INTER_AREA: every output pixel is the average of the input pixels its footprint covers,
#: weighted by the overlap. Shrinking, that is a box filter. Enlarging, most output pixels fall inside one input
#: pixel and copy it (blocky, like nearest neighbour), and those that straddle a pixel edge blend the two by overlap.
#: Torch's "area" (adaptive average pooling) differs when enlarging: it averages every input pixel a bin touches
#: with equal weights (a 6 -> 10 px ramp 0, 10, ... 50 gives 3.33 at OpenCV's second pixel, 5 at torch's).
RESIZE_MODES: dict[str, int] = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
RESIZE_DIRECTIONS: tuple[str, ...] = ("up", "down", "keep")
NOISE_KINDS: tuple[str, ...] = ("gaussian", "poisson")
#: The two orders of the final step.
FINAL_ORDERS: tuple[str, ...] = ("resize_sinc_then_jpeg", "jpeg_then_resize_sinc")

#: ITU-R BT.601 luma weights, used to turn an RGB image grey for grey Poisson noise.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


def _check_kernel_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size!r}")


def _kernel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets from the kernel centre: ``x`` grows along columns, ``y`` along rows (downwards)."""
    _check_kernel_size(size)
    half = size // 2
    axis = np.arange(-half, half + 1, dtype=np.float64)
    x, y = np.meshgrid(axis, axis)
    return x, y


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    """``d^T Sigma^-1 d`` for every offset ``d`` of the kernel grid.

    ``Sigma = R diag(sigma_x^2, sigma_y^2) R^T`` where ``R`` rotates by ``rotation`` radians: the kernel's
    ``sigma_x`` axis points along ``(cos rotation, sin rotation)`` in (column, row) coordinates, i.e. a positive
    rotation turns it clockwise on screen (rows grow downwards).
    """
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be positive, got sigma_x={sigma_x!r}, sigma_y={sigma_y!r}")
    x, y = _kernel_grid(size)
    cos, sin = math.cos(rotation), math.sin(rotation)
    # Coordinates of each offset in the kernel's own (rotated) frame.
    along = x * cos + y * sin
    across = -x * sin + y * cos
    return (along / sigma_x) ** 2 + (across / sigma_y) ** 2


def _normalised(kernel: np.ndarray) -> np.ndarray:
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0) -> np.ndarray:
    """Gaussian blur kernel, ``exp(-q / 2)``; isotropic when ``sigma_y`` is None (then ``sigma_y = sigma_x``)."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    return _normalised(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, rotation)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0, beta: float = 1.0
) -> np.ndarray:
    """Generalized Gaussian kernel, ``exp(-q^beta / 2)``: beta < 1 has heavier tails, beta > 1 a flatter top."""
    return _shaped_kernel(lambda qb: np.exp(-0.5 * qb), "generalized Gaussian", size, sigma_x, sigma_y, rotation, beta)


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0, beta: float = 1.0
) -> np.ndarray:
    """Plateau-shaped kernel, ``1 / (q^beta + 1)``: a flat top with slowly decaying shoulders."""
    return _shaped_kernel(lambda qb: 1.0 / (qb + 1.0), "plateau", size, sigma_x, sigma_y, rotation, beta)


def _shaped_kernel(profile, name: str, size, sigma_x, sigma_y, rotation, beta) -> np.ndarray:
    """``profile(q ** beta)`` normalised, for the kernels with a shape exponent ``beta``."""
    if beta <= 0:
        raise ValueError(f"{name} beta must be positive, got {beta!r}")
    sigma_y = sigma_x if sigma_y is None else sigma_y
    return _normalised(profile(_quadratic_form(size, sigma_x, sigma_y, rotation) ** beta))


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Ideal circular low-pass filter (2-D sinc, "jinc") with angular cutoff frequency ``cutoff`` (radians/pixel).

    ``k(r) = cutoff * J1(cutoff * r) / (2 pi r)``, with its limit ``cutoff^2 / (4 pi)`` at ``r = 0``. Cut to
    ``size`` it rings, which is the point: it imitates the ringing and overshoot artefacts of real images.
    """
    if not 0 < cutoff <= math.pi:
        raise ValueError(f"sinc cutoff must be in (0, pi], got {cutoff!r}")
    x, y = _kernel_grid(size)
    radius = np.hypot(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * j1(cutoff * radius) / (2.0 * math.pi * radius)
    kernel[radius == 0] = cutoff**2 / (4.0 * math.pi)
    return _normalised(kernel)


@dataclass
class KernelParams:
    """One blur kernel. Fields that a kind does not use are None (``cutoff`` for the Gaussians, ...)."""

    kind: str
    size: int
    sigma_x: float | None = None
    sigma_y: float | None = None
    rotation: float | None = None
    beta: float | None = None
    cutoff: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"unknown kernel kind {self.kind!r}; expected one of {KERNEL_KINDS}")
        _check_kernel_size(self.size)


def make_kernel(params: KernelParams) -> np.ndarray:
    """Build the float32 kernel (sums to 1) that ``params`` describes."""
    kind = params.kind
    if kind == "sinc":
        return sinc_kernel(params.size, _required(params, "cutoff"))
    sigma_x = _required(params, "sigma_x")
    sigma_y = params.sigma_y if params.sigma_y is not None else sigma_x
    rotation = params.rotation or 0.0
    if kind in ("iso", "aniso"):
        return gaussian_kernel(params.size, sigma_x, sigma_y, rotation)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(params.size, sigma_x, sigma_y, rotation, _required(params, "beta"))
    return plateau_kernel(params.size, sigma_x, sigma_y, rotation, _required(params, "beta"))


def _required(params: KernelParams, name: str) -> float:
    value = getattr(params, name)
    if value is None:
        raise ValueError(f"kernel kind {params.kind!r} needs {name!r}, got None in {params}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# Ops on float32 RGB images in [0, 1]
# ----------------------------------------------------------------------------------------------------------------


def blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve every channel with ``kernel``; borders are mirrored without repeating the edge pixel.

    The kernels here are point-symmetric, so correlation (what OpenCV computes) and convolution agree.

    Speed (the stage-1 blur runs on the full HR image): outer rings of the kernel that hold less than 1e-7 of its
    weight are dropped, and a kernel that is a sum of at most ``_MAX_SEPARABLE_RANK`` separable (row x column)
    kernels is applied as such passes, exact to ~1e-6. Otherwise OpenCV's ``filter2D`` does the work (it switches
    to an FFT for large kernels).
    """
    kernel = _trim_kernel(kernel)
    if kernel.shape[0] > _DIRECT_KERNEL_MAX_SIZE:
        passes = _separable_passes(kernel)
        if passes is not None:
            result = None
            for column, row in passes:
                term = cv2.sepFilter2D(image, -1, row, column, borderType=cv2.BORDER_REFLECT_101)
                result = term if result is None else result + term
            return result
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


#: Up to this size a direct 2-D filter is as fast as anything else.
_DIRECT_KERNEL_MAX_SIZE = 11
#: Beyond this many separable passes, filter2D's FFT path is faster.
_MAX_SEPARABLE_RANK = 3


def _trim_kernel(kernel: np.ndarray, tolerance: float = 1e-7) -> np.ndarray:
    """Drop outer rings of (near-)zero weight: a Gaussian of sigma 1 in a 21x21 window only needs 11x11."""
    while kernel.shape[0] > 1:
        ring_weight = np.abs(kernel).sum() - np.abs(kernel[1:-1, 1:-1]).sum()
        if ring_weight > tolerance:
            break
        kernel = kernel[1:-1, 1:-1]
    return kernel


def _separable_passes(kernel: np.ndarray, tolerance: float = 1e-6) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Write ``kernel`` as ``sum(column_i @ row_i)`` (an SVD truncated where the error drops below ``tolerance``,
    in summed absolute weight); None when that takes more than ``_MAX_SEPARABLE_RANK`` terms.

    An isotropic Gaussian is exactly one term; rotated anisotropic kernels usually need more.
    """
    u, singular, vt = np.linalg.svd(kernel.astype(np.float64))
    approximation = np.zeros_like(kernel, dtype=np.float64)
    for rank in range(min(_MAX_SEPARABLE_RANK, singular.size)):
        approximation += singular[rank] * np.outer(u[:, rank], vt[rank])
        if np.abs(kernel - approximation).sum() < tolerance:
            return [((u[:, i] * singular[i]).astype(np.float32), vt[i].astype(np.float32)) for i in range(rank + 1)]
    return None


def resize(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize to ``size = (height, width)`` with ``mode`` in :data:`RESIZE_MODES`; same size returns the input."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {tuple(RESIZE_MODES)}")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {size!r}")
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=RESIZE_MODES[mode])


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``floor(size * scale)`` per side, at least 1 (as ``torch.nn.functional.interpolate`` rounds)."""
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


def add_gaussian_noise(image: np.ndarray, sigma: float, grey: bool, seed: int) -> np.ndarray:
    """Add zero-mean Gaussian noise of standard deviation ``sigma`` (in 0-255 units), then clip to [0, 1].

    ``grey=True`` draws one noise plane and adds it to all three channels (luminance noise); otherwise each
    channel gets its own noise (colour noise). The noise field is drawn from ``seed``, so it is reproducible.
    """
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    planes = 1 if grey else image.shape[2]
    noise = rng.standard_normal((height, width, planes), dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(image + noise, 0.0, 1.0)


def add_poisson_noise(
    image: np.ndarray, scale: float, grey: bool, seed: int, exact_below: int = 16, levels: int = 256
) -> np.ndarray:
    """Add shot (Poisson) noise: ``scale * (Poisson(v * levels) / levels - v)`` per pixel value ``v``; clip to [0, 1].

    The pixel value is first rounded to 8 bits (``v = k / 255``), and the photon count is modelled with
    ``levels = 256``: the reference uses the next power of two above the image's number of distinct values,
    which is 256 for any natural photo. ``grey=True`` computes the noise on the luma of the image and adds the
    same noise to all channels.

    Speed: numpy's Poisson draws cost ~50 ns each, too slow for the 60 ms budget. Because ``k`` takes only 256
    values, counts are drawn in two exact-enough ways:

    * dark pixels, ``k < exact_below`` (expected count below ~16): exactly, by inverting a precomputed Poisson
      CDF table with one uniform draw each;
    * the rest: by the normal approximation ``round(count + sqrt(count) * z)``, which has the same mean and
      variance (the only difference is the skew, at most ``1 / sqrt(16) = 0.25``).

    ``exact_below=256`` makes every draw exact (slower).
    """
    rng = np.random.default_rng(seed)
    signal = (image @ _LUMA_WEIGHTS)[..., None] if grey else image
    grey_level = np.clip(np.round(signal * 255.0), 0, 255).astype(np.uint8)
    tables = _poisson_tables(levels, int(exact_below))
    expected = np.take(tables.expected, grey_level)
    counts = np.round(expected + np.take(tables.std, grey_level) * rng.standard_normal(expected.shape, np.float32))
    dark = grey_level < exact_below
    if dark.any():
        counts[dark] = _exact_poisson_counts(grey_level[dark], rng.random(int(dark.sum())), tables)
    noise = np.clip(counts, 0.0, None) / np.float32(levels) - grey_level / np.float32(255.0)
    return np.clip(image + noise * np.float32(scale), 0.0, 1.0)


#: Resolution of the guide table that speeds up the exact inverse-CDF Poisson draws (see _PoissonTables).
_GUIDE_BINS = 2048


@dataclass(frozen=True)
class _PoissonTables:
    """Lookup tables over the 256 possible 8-bit grey levels ``k`` (see :func:`add_poisson_noise`).

    Exact draws invert the CDF of row ``k``: the count is the number of CDF values <= a uniform draw ``u``. A
    binary search per pixel is slow (branchy), so a guide table first answers for each of ``_GUIDE_BINS`` bins of
    ``u``: the count at the bin's low end and just below its high end. Where the two agree (~98 % of draws) that
    is the answer; the rest fall back to the binary search. The result is exact either way.
    """

    expected: np.ndarray  # expected photon count k / 255 * levels, per level k
    std: np.ndarray  # its square root (the Poisson standard deviation)
    cdf: np.ndarray  # CDF rows of levels k < exact_below, row k shifted by +k (so the flat array increases)
    row_length: int  # buckets (counts 0 .. row_length - 1) per CDF row
    guide_low: np.ndarray  # [k * _GUIDE_BINS + bin] -> count at the bin's low end
    guide_high: np.ndarray  # [k * _GUIDE_BINS + bin] -> count just below the bin's high end


@functools.lru_cache(maxsize=8)
def _poisson_tables(levels: int, exact_below: int) -> _PoissonTables:
    expected = (np.arange(256, dtype=np.float64) / 255.0 * levels).astype(np.float32)
    exact_levels = min(exact_below, 256)
    brightest_rate = levels * exact_levels / 255.0
    # Enough buckets that the CDF of the brightest exactly-drawn level reaches 1 to within ~1e-12.
    row_length = int(math.ceil(brightest_rate + 12.0 * math.sqrt(brightest_rate) + 16))
    counts = np.arange(row_length, dtype=np.float64)
    bin_edges = np.arange(_GUIDE_BINS + 1, dtype=np.float64) / _GUIDE_BINS
    rows, guide_low, guide_high = [], [], []
    for level in range(exact_levels):
        rate = float(expected[level])
        if rate == 0.0:
            pmf = (counts == 0).astype(np.float64)
        else:
            pmf = np.exp(counts * math.log(rate) - rate - gammaln(counts + 1))
        cdf = np.minimum(np.cumsum(pmf), 1.0)
        cdf[-1] = 1.0  # the last bucket absorbs the (negligible) remaining tail
        rows.append(level + cdf)
        guide_low.append(np.searchsorted(cdf, bin_edges[:-1], side="right"))
        guide_high.append(np.searchsorted(cdf, bin_edges[1:], side="left"))
    return _PoissonTables(
        expected=expected,
        std=np.sqrt(expected),
        cdf=np.concatenate(rows) if rows else np.zeros(0),
        row_length=row_length,
        guide_low=np.concatenate(guide_low).astype(np.int32) if rows else np.zeros(0, np.int32),
        guide_high=np.concatenate(guide_high).astype(np.int32) if rows else np.zeros(0, np.int32),
    )


def _exact_poisson_counts(grey_level: np.ndarray, uniform: np.ndarray, tables: _PoissonTables) -> np.ndarray:
    """Exact Poisson draws for dark pixels by inverting their CDF row with one uniform draw each."""
    level = grey_level.astype(np.int32)
    guide_index = level * _GUIDE_BINS + (uniform * _GUIDE_BINS).astype(np.int32)
    counts = np.take(tables.guide_low, guide_index)
    unsure = np.flatnonzero(counts != np.take(tables.guide_high, guide_index))
    if unsure.size:
        found = np.searchsorted(tables.cdf, level[unsure] + uniform[unsure], side="right")
        counts[unsure] = found - level[unsure] * tables.row_length
    return counts.astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255], rounding to nearest."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def jpeg_encode(image: np.ndarray, quality: int) -> bytes:
    """Encode an RGB image (float in [0, 1] or uint8) as a baseline JPEG, 4:2:0 chroma, at ``quality`` (1-100)."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality!r}")
    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    # OpenCV expects BGR: without the swap the chroma planes would be computed from the wrong channels.
    ok, encoded = cv2.imencode(".jpg", pixels[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV only fails here on invalid input shapes
        raise RuntimeError(f"OpenCV failed to JPEG-encode an image of shape {pixels.shape}")
    return encoded.tobytes()


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip ``image`` through JPEG at ``quality``; returns float32 RGB in [0, 1]."""
    encoded = np.frombuffer(jpeg_encode(image, quality), dtype=np.uint8)
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return decoded[..., ::-1].astype(np.float32) / np.float32(255.0)


# ----------------------------------------------------------------------------------------------------------------
# Configuration: the ranges the sampler draws from
# ----------------------------------------------------------------------------------------------------------------

_ODD_SIZES_7_TO_21 = (7, 9, 11, 13, 15, 17, 19, 21)


@dataclass
class StageConfig:
    """Ranges for one degradation stage. The defaults are Real-ESRGAN's first stage (x4plus options)."""

    blur_prob: float = field(default=1.0, metadata={"help": "Probability that this stage blurs at all."})
    kernel_sizes: tuple[int, ...] = field(
        default=_ODD_SIZES_7_TO_21, metadata={"help": "Odd blur kernel sizes, one drawn uniformly."}
    )
    kernel_types: tuple[str, ...] = field(
        default=("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"),
        metadata={"help": "Kernel families of the blur mix (see KERNEL_KINDS; 'sinc' comes from sinc_prob)."},
    )
    kernel_probs: tuple[float, ...] = field(
        default=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03), metadata={"help": "Probability of each kernel_types entry."}
    )
    blur_sigma: tuple[float, float] = field(
        default=(0.2, 3.0), metadata={"help": "Range of the kernel sigmas, in pixels of this stage's input."}
    )
    generalized_beta: tuple[float, float] = field(
        default=(0.5, 4.0),
        metadata={"help": "Range of the generalized Gaussian beta (half the draws below 1, half above)."},
    )
    plateau_beta: tuple[float, float] = field(
        default=(1.0, 2.0), metadata={"help": "Range of the plateau kernel beta (half below 1, half above)."}
    )
    sinc_prob: float = field(
        default=0.1, metadata={"help": "Probability that the blur kernel is a 2-D sinc instead of the mix."}
    )
    resize_probs: tuple[float, float, float] = field(
        default=(0.2, 0.7, 0.1), metadata={"help": "Probabilities of resizing up, down, or keeping the size."}
    )
    resize_scale: tuple[float, float] = field(
        default=(0.15, 1.5),
        metadata={"help": "Scale range: 'down' draws from (low, 1), 'up' from (1, high)."},
    )
    resize_modes: tuple[str, ...] = field(
        default=("area", "bilinear", "bicubic"), metadata={"help": "Interpolation modes, one drawn uniformly."}
    )
    gaussian_noise_prob: float = field(
        default=0.5, metadata={"help": "Probability of Gaussian noise; otherwise Poisson noise."}
    )
    noise_sigma: tuple[float, float] = field(
        default=(1.0, 30.0), metadata={"help": "Gaussian noise standard deviation range, in 0-255 units."}
    )
    poisson_scale: tuple[float, float] = field(
        default=(0.05, 3.0), metadata={"help": "Poisson noise scale range (multiplies the shot noise)."}
    )
    grey_noise_prob: float = field(
        default=0.4, metadata={"help": "Probability that the noise is the same in all channels (grey noise)."}
    )
    jpeg_quality: tuple[int, int] | None = field(
        default=(30, 95),
        metadata={"help": "JPEG quality range at the end of the stage; None = no JPEG in this stage."},
    )

    @classmethod
    def second_stage(cls) -> StageConfig:
        """Real-ESRGAN's second stage: weaker blur (p=0.8), different resize odds, no JPEG (the final step has it)."""
        return cls(
            blur_prob=0.8,
            blur_sigma=(0.2, 1.5),
            resize_probs=(0.3, 0.4, 0.3),
            resize_scale=(0.3, 1.2),
            noise_sigma=(1.0, 25.0),
            poisson_scale=(0.05, 2.5),
            jpeg_quality=None,
        )

    def __post_init__(self) -> None:
        _check_probability("blur_prob", self.blur_prob)
        _check_probability("sinc_prob", self.sinc_prob)
        _check_probability("gaussian_noise_prob", self.gaussian_noise_prob)
        _check_probability("grey_noise_prob", self.grey_noise_prob)
        for size in self.kernel_sizes:
            _check_kernel_size(size)
        unknown = [kind for kind in self.kernel_types if kind not in KERNEL_KINDS or kind == "sinc"]
        if unknown:
            raise ValueError(f"kernel_types has unknown or misplaced kinds {unknown}; use sinc_prob for 'sinc'")
        if len(self.kernel_types) != len(self.kernel_probs):
            raise ValueError(
                f"kernel_types ({len(self.kernel_types)}) and kernel_probs ({len(self.kernel_probs)}) differ in length"
            )
        _check_distribution("kernel_probs", self.kernel_probs)
        _check_distribution("resize_probs", self.resize_probs)
        unknown_modes = [mode for mode in self.resize_modes if mode not in RESIZE_MODES]
        if unknown_modes or not self.resize_modes:
            raise ValueError(
                f"resize_modes must be a non-empty subset of {tuple(RESIZE_MODES)}, got {self.resize_modes}"
            )
        for name in ("blur_sigma", "generalized_beta", "plateau_beta", "resize_scale", "noise_sigma", "poisson_scale"):
            _check_range(name, getattr(self, name), positive=True)
        if not self.resize_scale[0] <= 1.0 <= self.resize_scale[1]:
            raise ValueError(f"resize_scale must contain 1.0 (low for 'down', high for 'up'), got {self.resize_scale}")
        if self.jpeg_quality is not None:
            _check_range("jpeg_quality", self.jpeg_quality, positive=True)
            if self.jpeg_quality[1] > 100:
                raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")


@dataclass
class DegradationConfig:
    """All ranges of the second-order degradation. Defaults: Real-ESRGAN x4plus (see REFERENCE.md section 1.5)."""

    first_stage: StageConfig = field(
        default_factory=StageConfig, metadata={"help": "Ranges of stage 1 (blur, resize, noise, JPEG)."}
    )
    second_stage: StageConfig = field(
        default_factory=StageConfig.second_stage,
        metadata={"help": "Ranges of stage 2 (blur, resize relative to the LR size, noise)."},
    )
    final_resize_first_prob: float = field(
        default=0.5,
        metadata={"help": "Probability that the final step resizes + sinc-filters before JPEG (else JPEG first)."},
    )
    final_resize_modes: tuple[str, ...] = field(
        default=("area", "bilinear", "bicubic"), metadata={"help": "Modes of the final resize to the LR size."}
    )
    final_sinc_prob: float = field(
        default=0.8, metadata={"help": "Probability of the sinc filter after the final resize."}
    )
    final_sinc_sizes: tuple[int, ...] = field(
        default=_ODD_SIZES_7_TO_21, metadata={"help": "Odd sizes of the final sinc kernel."}
    )
    final_sinc_cutoff: tuple[float, float] = field(
        default=(math.pi / 3, math.pi), metadata={"help": "Cutoff range (radians/pixel) of the final sinc kernel."}
    )
    final_jpeg_quality: tuple[int, int] = field(
        default=(30, 95), metadata={"help": "JPEG quality range of the final step."}
    )
    output_resize_mode: str = field(
        default="bicubic",
        metadata={"help": "Mode of the optional last resize of the LR image to the requested output size."},
    )
    gt_usm: bool = field(
        default=True,
        metadata={
            "help": "Degrade an unsharp-masked copy of the HR (Real-ESRGAN's gt_usm, on there); the HR targets stay "
            "unsharpened. False degrades the plain HR (what datasets built before label version 2 did)."
        },
    )
    usm_weight: float = field(default=0.5, metadata={"help": "Unsharp-mask weight (Real-ESRGAN: 0.5)."})
    usm_radius: int = field(
        default=50, metadata={"help": "Unsharp-mask Gaussian size; even sizes grow by one (Real-ESRGAN: 50 -> 51)."}
    )
    usm_threshold: float = field(
        default=10.0, metadata={"help": "Residuals above this (0-255 units) are sharpened (Real-ESRGAN: 10)."}
    )

    def __post_init__(self) -> None:
        # Accept plain dicts (from JSON) for the nested stages.
        if isinstance(self.first_stage, dict):
            self.first_stage = _from_dict(StageConfig, self.first_stage)
        if isinstance(self.second_stage, dict):
            self.second_stage = _from_dict(StageConfig, self.second_stage)
        _check_probability("final_resize_first_prob", self.final_resize_first_prob)
        _check_probability("final_sinc_prob", self.final_sinc_prob)
        for size in self.final_sinc_sizes:
            _check_kernel_size(size)
        _check_range("final_sinc_cutoff", self.final_sinc_cutoff, positive=True)
        _check_range("final_jpeg_quality", self.final_jpeg_quality, positive=True)
        for mode in (*self.final_resize_modes, self.output_resize_mode):
            if mode not in RESIZE_MODES:
                raise ValueError(f"unknown resize mode {mode!r}; expected one of {tuple(RESIZE_MODES)}")
        UsmParams(weight=self.usm_weight, radius=self.usm_radius, threshold=self.usm_threshold)  # validates

    def usm(self) -> UsmParams | None:
        """The unsharp mask the sampler records, None with ``gt_usm=False``."""
        if not self.gt_usm:
            return None
        return UsmParams(
            weight=float(self.usm_weight), radius=int(self.usm_radius), threshold=float(self.usm_threshold)
        )

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationConfig:
        return _from_dict(cls, data)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_distribution(name: str, probs: tuple[float, ...]) -> None:
    if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name} must be non-negative and sum to 1, got {probs}")


def _check_range(name: str, value: tuple[float, float], positive: bool) -> None:
    low, high = value
    if low > high or (positive and low <= 0):
        raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high, got {value}")


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    # JSON turns tuples into lists; the dataclasses want tuples.
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python scalars, recursively, so ``json.dumps`` accepts the result."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------------------------
# The record: everything needed to replay one degradation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ResizeParams:
    """One resize. ``out_size`` is what is applied; ``direction`` and ``scale`` say how it was drawn."""

    mode: str
    out_size: tuple[int, int]
    direction: str = "keep"
    scale: float = 1.0


@dataclass
class NoiseParams:
    """Additive noise: ``sigma`` (0-255 units) for Gaussian noise, ``scale`` for Poisson noise; ``seed`` the field."""

    kind: str
    grey: bool
    seed: int
    sigma: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {self.kind!r}; expected one of {NOISE_KINDS}")


@dataclass
class StageRecord:
    """What one stage did: blur (None = skipped), resize, noise, JPEG quality (None = no JPEG in this stage)."""

    blur: KernelParams | None
    resize: ResizeParams
    noise: NoiseParams
    jpeg_quality: int | None


@dataclass
class FinalRecord:
    """The final step: resize to the LR size, optional sinc filter, JPEG, in the recorded ``order``."""

    order: str
    resize: ResizeParams
    sinc: KernelParams | None
    jpeg_quality: int

    def __post_init__(self) -> None:
        if self.order not in FINAL_ORDERS:
            raise ValueError(f"unknown final order {self.order!r}; expected one of {FINAL_ORDERS}")


@dataclass
class UsmParams:
    """Unsharp masking of the HR before stage 1 (Real-ESRGAN's ``gt_usm``); see :func:`usm_sharpen`."""

    weight: float = 0.5
    radius: int = 50
    threshold: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.radius, (int, np.integer)) or self.radius < 1:
            raise ValueError(f"usm radius must be a positive integer, got {self.radius!r}")
        if self.weight < 0 or self.threshold < 0:
            raise ValueError(f"usm weight and threshold must be >= 0, got {self.weight!r} and {self.threshold!r}")


@dataclass
class DegradationRecord:
    """A full, replayable degradation: sizes, the optional unsharp mask of the HR, two stages, the final step and
    the optional output resize. ``usm`` is None for "no sharpening", which is also what a record written before
    the field existed means (those datasets degraded the plain HR)."""

    hr_size: tuple[int, int]
    scale: int
    lr_size: tuple[int, int]
    first_stage: StageRecord
    second_stage: StageRecord
    final: FinalRecord
    output_resize: ResizeParams
    usm: UsmParams | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return _jsonable(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationRecord:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                hr_size=_size(data["hr_size"]),
                scale=int(data["scale"]),
                lr_size=_size(data["lr_size"]),
                first_stage=_stage_from_dict(data["first_stage"]),
                second_stage=_stage_from_dict(data["second_stage"]),
                final=FinalRecord(
                    order=data["final"]["order"],
                    resize=_resize_from_dict(data["final"]["resize"]),
                    sinc=_kernel_from_dict(data["final"]["sinc"]),
                    jpeg_quality=int(data["final"]["jpeg_quality"]),
                ),
                output_resize=_resize_from_dict(data["output_resize"]),
                usm=None if data.get("usm") is None else UsmParams(**data["usm"]),
            )
        except KeyError as missing:
            raise ValueError(f"degradation record is missing the field {missing}") from None

    @classmethod
    def from_json(cls, text: str) -> DegradationRecord:
        return cls.from_dict(json.loads(text))


def _size(value: Any) -> tuple[int, int]:
    return int(value[0]), int(value[1])


def _kernel_from_dict(data: dict[str, Any] | None) -> KernelParams | None:
    return None if data is None else KernelParams(**data)


def _resize_from_dict(data: dict[str, Any]) -> ResizeParams:
    return ResizeParams(
        mode=data["mode"], out_size=_size(data["out_size"]), direction=data["direction"], scale=data["scale"]
    )


def _stage_from_dict(data: dict[str, Any]) -> StageRecord:
    return StageRecord(
        blur=_kernel_from_dict(data["blur"]),
        resize=_resize_from_dict(data["resize"]),
        noise=NoiseParams(**data["noise"]),
        jpeg_quality=None if data["jpeg_quality"] is None else int(data["jpeg_quality"]),
    )


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    return int(size[0]), int(size[1])


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _choice(rng: np.random.Generator, options: tuple, probs: tuple[float, ...] | None = None) -> Any:
    index = int(rng.choice(len(options), p=None if probs is None else np.asarray(probs, dtype=np.float64)))
    return options[index]


def _beta(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """Real-ESRGAN's beta draw: half the time from (low, 1), half from (1, high)."""
    if rng.uniform() < 0.5:
        return _uniform(rng, (bounds[0], min(1.0, bounds[1])))
    return _uniform(rng, (max(1.0, bounds[0]), bounds[1]))


def _sample_blur_kernel(rng: np.random.Generator, config: StageConfig) -> KernelParams:
    size = int(_choice(rng, config.kernel_sizes))
    if rng.uniform() < config.sinc_prob:
        # Small kernels cannot represent very low cutoffs without heavy truncation, hence the narrower range.
        low = math.pi / 3 if size < 13 else math.pi / 5
        return KernelParams(kind="sinc", size=size, cutoff=_uniform(rng, (low, math.pi)))
    kind = _choice(rng, config.kernel_types, config.kernel_probs)
    sigma_x = _uniform(rng, config.blur_sigma)
    if kind in ("iso", "generalized_iso", "plateau_iso"):
        sigma_y, rotation = sigma_x, 0.0
    else:
        sigma_y, rotation = _uniform(rng, config.blur_sigma), _uniform(rng, (-math.pi, math.pi))
    beta = None
    if kind.startswith("generalized"):
        beta = _beta(rng, config.generalized_beta)
    elif kind.startswith("plateau"):
        beta = _beta(rng, config.plateau_beta)
    return KernelParams(kind=kind, size=size, sigma_x=sigma_x, sigma_y=sigma_y, rotation=rotation, beta=beta)


def _sample_resize(rng: np.random.Generator, config: StageConfig, reference_size: tuple[int, int]) -> ResizeParams:
    direction = _choice(rng, RESIZE_DIRECTIONS, config.resize_probs)
    if direction == "up":
        scale = _uniform(rng, (1.0, config.resize_scale[1]))
    elif direction == "down":
        scale = _uniform(rng, (config.resize_scale[0], 1.0))
    else:
        scale = 1.0
    mode = _choice(rng, config.resize_modes)
    return ResizeParams(mode=mode, out_size=scaled_size(reference_size, scale), direction=direction, scale=scale)


def _sample_noise(rng: np.random.Generator, config: StageConfig) -> NoiseParams:
    if rng.uniform() < config.gaussian_noise_prob:
        sigma, scale, kind = _uniform(rng, config.noise_sigma), None, "gaussian"
    else:
        sigma, scale, kind = None, _uniform(rng, config.poisson_scale), "poisson"
    grey = bool(rng.uniform() < config.grey_noise_prob)
    seed = int(rng.integers(0, 2**32))
    return NoiseParams(kind=kind, grey=grey, seed=seed, sigma=sigma, scale=scale)


def _sample_quality(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(int(bounds[0]), int(bounds[1]) + 1))


def _sample_stage(rng: np.random.Generator, config: StageConfig, resize_reference: tuple[int, int]) -> StageRecord:
    # Draw every field unconditionally first and in a fixed order, so that changing one probability does not
    # shift the random stream of the others more than necessary.
    apply_blur = rng.uniform() < config.blur_prob
    kernel = _sample_blur_kernel(rng, config)
    resize_params = _sample_resize(rng, config, resize_reference)
    noise = _sample_noise(rng, config)
    quality = None if config.jpeg_quality is None else _sample_quality(rng, config.jpeg_quality)
    return StageRecord(blur=kernel if apply_blur else None, resize=resize_params, noise=noise, jpeg_quality=quality)


def sample_degradation(
    config: DegradationConfig | None,
    rng: np.random.Generator | int,
    hr_size: int | tuple[int, int],
    scale: int = 4,
    output_size: int | tuple[int, int] | None = None,
) -> DegradationRecord:
    """Draw one full degradation record.

    Args:
        config: parameter ranges; None = Real-ESRGAN defaults.
        rng: a numpy Generator, or an int seed (same seed -> same record).
        hr_size: size of the HR image, an int (square) or ``(height, width)``.
        scale: super-resolution factor; the LR size is ``hr_size // scale``.
        output_size: size of the returned LR image; None = the LR size. A larger value (e.g. the HR size, the
            model's input canvas) adds a plain resize at the very end, recorded as ``output_resize``.
    """
    config = config or DegradationConfig()
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(int(rng))
    hr = _pair(hr_size)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    lr = (hr[0] // scale, hr[1] // scale)
    if min(lr) < 1:
        raise ValueError(f"HR size {hr} is smaller than the scale {scale}: the LR image would be empty")
    first = _sample_stage(rng, config.first_stage, hr)
    # Stage 2 resizes relative to the LR size, not to stage 1's output (as in Real-ESRGAN).
    second = _sample_stage(rng, config.second_stage, lr)

    order = FINAL_ORDERS[0] if rng.uniform() < config.final_resize_first_prob else FINAL_ORDERS[1]
    final_mode = _choice(rng, config.final_resize_modes)
    apply_sinc = rng.uniform() < config.final_sinc_prob
    sinc = KernelParams(
        kind="sinc",
        size=int(_choice(rng, config.final_sinc_sizes)),
        cutoff=_uniform(rng, config.final_sinc_cutoff),
    )
    final = FinalRecord(
        order=order,
        resize=_resize_between(second.resize.out_size, lr, final_mode),
        sinc=sinc if apply_sinc else None,
        jpeg_quality=_sample_quality(rng, config.final_jpeg_quality),
    )
    out = lr if output_size is None else _pair(output_size)
    return DegradationRecord(
        hr_size=hr,
        scale=int(scale),
        lr_size=lr,
        first_stage=first,
        second_stage=second,
        final=final,
        output_resize=_resize_between(lr, out, config.output_resize_mode),
        usm=config.usm(),  # not random: drawn from nothing, so the draws above are the same with it on or off
    )


def _resize_between(source: tuple[int, int], target: tuple[int, int], mode: str) -> ResizeParams:
    """A resize whose size is fixed by the pipeline; ``scale`` and ``direction`` describe it (by width)."""
    scale = target[1] / source[1]
    direction = "up" if scale > 1 else "down" if scale < 1 else "keep"
    return ResizeParams(mode=mode, out_size=target, direction=direction, scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# Applying a record
# ----------------------------------------------------------------------------------------------------------------

#: Transparent pixels are composited onto this background (white), here and in ``prepare-data``.
_BACKGROUND = 255


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and 32-bit integer images are scaled (not clipped), float images in
    [0, 1] are stretched to [0, 255], and transparency is composited onto white.

    ``prepare-data`` reads every file through this, and :func:`apply_degradation` every PIL input.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        # "I;16*" is 16-bit by definition; "I" (32-bit) holds 16-bit PNGs in older Pillow versions.
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (_BACKGROUND,) * 4)
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def as_float_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """An HR input -> float32 RGB array (H, W, 3) in [0, 1], read the way ``prepare-data`` reads files.

    * PIL images, any mode: :func:`to_rgb8` (16-bit scaled by 1/257, float [0, 1] stretched, palette expanded,
      transparency composited onto white, grey repeated in the three channels).
    * Arrays (H, W), (H, W, 1) grey, (H, W, 2) grey + alpha, (H, W, 3) RGB, (H, W, 4) RGBA:

      - ``uint8``: 0-255; ``uint16``: 0-65535 (16-bit), other integer types: 0-255, or 16-bit when a value is
        above 255 (as PIL's 32-bit mode "I" is read); negative values or values above 65535 are refused;
      - floats: [0, 1] when no value is above 1 (kept at full precision), else 0-255 (divided by 255); values
        above 255, NaN and infinities are refused, values below 0 are clipped to 0;
      - alpha (the last channel of 2 or 4) is composited onto white.

    Anything else raises a ValueError that says what was expected.
    """
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb8(image)).astype(np.float32) / np.float32(255.0)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4), got shape {array.shape}"
        )
    values = _unit_range(array)
    channels = values.shape[2]
    if channels in (2, 4):
        alpha = values[..., -1:]
        values = values[..., :-1] * alpha + np.float32(_BACKGROUND / 255.0) * (np.float32(1.0) - alpha)
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.ascontiguousarray(values, dtype=np.float32)


def _unit_range(array: np.ndarray) -> np.ndarray:
    """Array values -> float32 in [0, 1] (see :func:`as_float_rgb`)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"expected an image of integer or float values, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"integer image values must be within 0..65535 (8 or 16 bit), got {low}..{high} (dtype {array.dtype})"
            )
        sixteen_bit = array.dtype == np.uint16 or high > 255
        return (array.astype(np.float64) / (65535.0 if sixteen_bit else 255.0)).astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError("the float image holds NaN or infinite values")
    high = float(array.max())
    if high > 255.0:
        raise ValueError(
            f"float image values go up to {high:g}: expected [0, 1] or [0, 255]; scale it into one of those ranges"
        )
    values = array.astype(np.float32)
    if high > 1.0:
        values = values / np.float32(255.0)
    return np.clip(values, 0.0, 1.0)


def usm_sharpen(image: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10.0) -> np.ndarray:
    """Unsharp masking as Real-ESRGAN sharpens its ground truth before degrading it (``gt_usm``).

    With ``G`` a Gaussian blur of size ``radius`` (an even size grows by one: 50 -> 51) and OpenCV's default sigma
    for that size (``sigma = 0 -> 0.3 ((size - 1) / 2 - 1) + 0.8``, 8.0 at 51), mirrored borders:
    ``residual = I - G(I)``; ``mask = |residual| * 255 > threshold`` per channel; ``soft = G(mask)``;
    ``out = soft * clip(I + weight * residual, 0, 1) + (1 - soft) * I``.

    Facts from BasicSR ``basicsr/utils/img_process_util.py`` (``usm_sharp`` and ``USMSharp``: radius 50, sigma 0,
    weight 0.5, threshold 10, the soft mask) and Real-ESRGAN ``realesrgan/models/realesrgan_model.py``
    (``feed_data`` blurs ``self.gt_usm``, the sharpened ground truth, for the first degradation); BasicSR's
    ``filter2D`` pads with torch's "reflect", which is OpenCV's BORDER_REFLECT_101. This is our own implementation.
    """
    size = int(radius) + 1 if int(radius) % 2 == 0 else int(radius)
    kernel = cv2.getGaussianKernel(size, 0, ktype=cv2.CV_32F)

    def gaussian(x: np.ndarray) -> np.ndarray:
        return cv2.sepFilter2D(x, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)

    # The same arithmetic in fewer passes (OpenCV's vectorised ops, in place where possible): 17 ms instead of
    # 26 ms at 512^2 on one core. image + weight * residual = (1 + weight) image - weight G(image).
    blurred = gaussian(image)
    _, mask = cv2.threshold(cv2.absdiff(image, blurred), float(threshold) / 255.0, 1.0, cv2.THRESH_BINARY)
    soft = gaussian(mask)
    sharpened = cv2.addWeighted(image, 1.0 + float(weight), blurred, -float(weight), 0.0)
    np.clip(sharpened, 0.0, 1.0, out=sharpened)
    sharpened -= image  # soft * sharpened + (1 - soft) * image = image + soft * (sharpened - image)
    sharpened *= soft
    sharpened += image
    return sharpened


def _apply_noise(image: np.ndarray, noise: NoiseParams) -> np.ndarray:
    strength = noise.sigma if noise.kind == "gaussian" else noise.scale
    if float(strength) == 0.0:
        # A zero-strength draw adds zeros: only the clip remains (what add_*_noise would return, without drawing).
        return np.clip(image, 0.0, 1.0)
    if noise.kind == "gaussian":
        return add_gaussian_noise(image, float(noise.sigma), noise.grey, noise.seed)
    return add_poisson_noise(image, float(noise.scale), noise.grey, noise.seed)


def _apply_stage(image: np.ndarray, stage: StageRecord) -> np.ndarray:
    if stage.blur is not None:
        image = blur(image, make_kernel(stage.blur))
    image = resize(image, stage.resize.out_size, stage.resize.mode)
    image = _apply_noise(image, stage.noise)
    if stage.jpeg_quality is not None:
        image = jpeg_compress(image, stage.jpeg_quality)
    return image


def _apply_final(image: np.ndarray, final: FinalRecord) -> np.ndarray:
    def resize_and_sinc(x: np.ndarray) -> np.ndarray:
        x = resize(x, final.resize.out_size, final.resize.mode)
        return x if final.sinc is None else blur(x, make_kernel(final.sinc))

    if final.order == "resize_sinc_then_jpeg":
        return jpeg_compress(resize_and_sinc(image), final.jpeg_quality)
    return resize_and_sinc(jpeg_compress(image, final.jpeg_quality))


def without_noise(record: DegradationRecord) -> DegradationRecord:
    """The same record with both noise draws zeroed (Gaussian sigma 0, Poisson scale 0); everything else, the
    clipping included, is replayed as recorded. Used to measure the noise that survives to the LR."""
    stages = {}
    for name in ("first_stage", "second_stage"):
        stage = getattr(record, name)
        zero = {"sigma": 0.0} if stage.noise.kind == "gaussian" else {"scale": 0.0}
        stages[name] = dataclasses.replace(stage, noise=dataclasses.replace(stage.noise, **zero))
    return dataclasses.replace(record, **stages)


def _hr_float(hr: np.ndarray | Image.Image, record: DegradationRecord) -> np.ndarray:
    image = as_float_rgb(hr)
    if image.shape[:2] != tuple(record.hr_size):
        raise ValueError(
            f"HR image is {image.shape[0]}x{image.shape[1]} (HxW) but the record was drawn for "
            f"{record.hr_size[0]}x{record.hr_size[1]}"
        )
    return image


def _sharpened(image: np.ndarray, record: DegradationRecord) -> np.ndarray:
    usm = record.usm
    return image if usm is None else usm_sharpen(image, usm.weight, usm.radius, usm.threshold)


def _to_lr(sharpened: np.ndarray, record: DegradationRecord) -> np.ndarray:
    """Stages 1 and 2 and the final step on the (sharpened) HR: float32 at the LR size, before the output resize."""
    image = _apply_stage(sharpened, record.first_stage)
    image = _apply_stage(image, record.second_stage)
    return _apply_final(image, record.final)


def apply_degradation_array(
    hr: np.ndarray | Image.Image, record: DegradationRecord, *, noise: bool = True, at_lr_size: bool = False
) -> np.ndarray:
    """Like :func:`apply_degradation` but returns the uint8 (H, W, 3) array.

    ``noise=False`` replays the record with its noise draws zeroed (:func:`without_noise`); ``at_lr_size=True``
    leaves out the output resize (the array is ``lr_size``, whatever ``output_resize`` says).
    """
    image = _sharpened(_hr_float(hr, record), record)
    image = _to_lr(image, record if noise else without_noise(record))
    if not at_lr_size:
        image = resize(image, record.output_resize.out_size, record.output_resize.mode)
    return to_uint8(image)


def apply_degradation(hr: np.ndarray | Image.Image, record: DegradationRecord) -> Image.Image:
    """Replay ``record`` on an HR image; returns the LR image as a PIL RGB image.

    ``hr``: a PIL image of any mode or an array, converted by :func:`as_float_rgb` the way ``prepare-data`` reads
    files (16-bit, float 0-255, grey and RGBA are handled; other inputs are refused with a message).
    Deterministic: the only randomness, the noise fields, is drawn from the seeds stored in the record.
    """
    return Image.fromarray(apply_degradation_array(hr, record))


def apply_degradation_with_residual_noise(
    hr: np.ndarray | Image.Image, record: DegradationRecord
) -> tuple[Image.Image, float]:
    """``(apply_degradation(hr, record), residual noise)`` with one sharpening and two replays.

    The residual noise is the noise left in the LR image: the standard deviation, in 0-255 units, of the LR
    (at ``lr_size``, as uint8) minus the LR replayed with the noise draws zeroed (:func:`without_noise`). Later
    blur, resizing, JPEG, the sinc filter and clipping all act on it, and Poisson noise follows the brightness.
    """
    sharpened = _sharpened(_hr_float(hr, record), record)
    noisy = _to_lr(sharpened, record)
    clean = _to_lr(sharpened, without_noise(record))
    residual = residual_noise_std(to_uint8(noisy), to_uint8(clean))
    output = resize(noisy, record.output_resize.out_size, record.output_resize.mode)
    return Image.fromarray(to_uint8(output)), residual


def residual_noise_std(noisy: np.ndarray, clean: np.ndarray) -> float:
    """Standard deviation of ``noisy - clean`` (uint8 images, or any arrays in 0-255 units), in 0-255 units."""
    return float(np.std(noisy.astype(np.float64) - clean.astype(np.float64)))


def degrade(
    hr: np.ndarray | Image.Image,
    seed: int,
    scale: int = 4,
    config: DegradationConfig | None = None,
    output_size: int | tuple[int, int] | None = None,
) -> tuple[Image.Image, DegradationRecord]:
    """Sample a record for ``hr`` from ``seed`` and apply it: the one-call convenience."""
    size = hr.size[::-1] if isinstance(hr, Image.Image) else np.asarray(hr).shape[:2]
    record = sample_degradation(config, seed, size, scale, output_size=output_size)
    return apply_degradation(hr, record), record
