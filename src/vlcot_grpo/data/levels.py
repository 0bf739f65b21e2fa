"""Degradation levels: from a record (and its replay) to "light / medium / heavy" per step, to text, and back.

The VLCoT ``<degradation>`` block names one level per pipeline step, e.g.
"medium blur, heavy downsample, heavy noise, light compression, light upsample". This module

* measures each step's effective strength, what the LR image shows of it (:func:`degradation_measures`), from a
  :class:`~vlcot_grpo.data.degradations.DegradationRecord` and, for noise, its replay on the HR image, and
  buckets it with :class:`LevelThresholds` (:func:`levels_from_measures`, :func:`levels_from_record`);
* renders levels as text (:func:`levels_to_text`);
* parses such text back, tolerating order, case, accents, punctuation, extra words and synonyms, reading
  negations and quality words the right way round (:func:`parse_degradation_text`), and reports what it could
  not read.

What each step measures (label version 2, :data:`LABEL_VERSION`; "HR pixels" = pixels of the high-resolution
image; widths are image widths):

============  =================================================================================  ==============
step          measure                                                                            applied when
============  =================================================================================  ==============
blur          effective blur width in HR pixels (:func:`blur_width`): the kernel variances       any of the
              (:func:`kernel_variance`, on the kernels actually applied, shape and truncation    three blurs
              included; sinc by its half-amplitude frequency) of the stage-1 blur, the stage-2
              blur and the final sinc, each in HR pixels (times the HR / stage size ratio),
              added (variances add under convolution); ``sqrt`` of the sum
downsample    HR width / the narrowest width the image passes through (>= the SR scale)          factor > 1
              (:func:`downsample_factor`)
noise         the noise left in the LR (:func:`residual_noise`): std, 0-255 units, of the LR     always
              minus the LR replayed with the noise draws zeroed; later blur, resizing, JPEG,
              sinc, clipping and brightness (Poisson) all count. Datasets store it; without
              the HR image, :func:`noise_estimate` replays the record on flat grey
compression   effective JPEG quality (:func:`effective_jpeg_quality`): each JPEG's               always
              quantisation strength, shrunk by the reductions after it, combined; lower =
              heavier
upsample      LR width / the narrowest width before it (:func:`upsample_factor`): the LR is an     narrowest <
              enlargement of that smaller image; enlargements shrunk again later leave no trace   the LR width
============  =================================================================================  ==============

The default thresholds are the tertiles of the default Real-ESRGAN sampler (scale 4) for blur, noise, compression
and upsample; downsample, exactly the SR scale in most records, is light there and split in halves above it
(docs/rewards.md has the table, ``benchmarks/degradation_levels.py`` measures it).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vlcot_grpo.data.degradations import (
    DegradationRecord,
    KernelParams,
    apply_degradation_with_residual_noise,
    make_kernel,
)

#: Pipeline steps, in the order of the paper's degradation text.
STEPS: tuple[str, ...] = ("blur", "downsample", "noise", "compression", "upsample")
#: Levels, from weakest to strongest.
LEVELS: tuple[str, ...] = ("light", "medium", "heavy")
#: Level given to a step that the text names without a level (the paper writes "downsample", "upsample").
DEFAULT_LEVEL = "medium"
#: Version of the labelling, stored with every dataset row (``label_version``). 1: the levels of the sampled
#: parameters (kernel sigmas, nominal noise sigma, final JPEG quality, the largest single enlargement), datasets
#: made before the column existed. 2: effective measures (this module's table), the noise from the replay.
LABEL_VERSION = 2


# ----------------------------------------------------------------------------------------------------------------
# Thresholds: the one table of level boundaries (the labeller, the parser's numbers and docs/rewards.md use it)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LevelThresholds:
    """Bucket boundaries ``(light_below, heavy_from)`` of each step's measure (:func:`degradation_measures`):
    below the first -> light, from the second on -> heavy, in between -> medium. For the JPEG quality the direction
    is reversed, ``(light_at_or_above, heavy_below)``: lower quality is heavier.

    The defaults are the tertiles of the default Real-ESRGAN sampler (scale 4, 512² demo photos, gt_usm on),
    measured by ``benchmarks/degradation_levels.py`` (docs/rewards.md has the table and the command); downsample,
    which is exactly the SR scale for most records, is light there and split in two above it.
    """

    blur_sigma: tuple[float, float] = field(
        default=(2.7, 3.7),
        metadata={
            "help": "Effective blur width in HR pixels (kernel std, stages combined), (light_below, heavy_from)."
        },
    )
    downsample_factor: tuple[float, float] = field(
        default=(4.05, 5.9),
        metadata={"help": "HR width / narrowest width in the pipeline, (light_below, heavy_from)."},
    )
    noise_sigma: tuple[float, float] = field(
        default=(6.2, 9.6),
        metadata={"help": "Residual noise std in the LR, 0-255 units, (light_below, heavy_from)."},
    )
    jpeg_quality: tuple[float, float] = field(
        default=(71.0, 49.0),
        metadata={"help": "Effective JPEG quality (light_at_or_above, heavy_below): lower is heavier."},
    )
    upsample_factor: tuple[float, float] = field(
        default=(1.3, 1.73),
        metadata={"help": "LR width / narrowest width before it, (light_below, heavy_from)."},
    )

    def __post_init__(self) -> None:
        for name in ("blur_sigma", "downsample_factor", "noise_sigma", "upsample_factor"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(
                    f"LevelThresholds.{name} must be (light_below, heavy_from) with low <= high, got {(low, high)}"
                )
        light_from, heavy_below = self.jpeg_quality
        if heavy_below > light_from:
            raise ValueError(
                f"LevelThresholds.jpeg_quality must be (light_at_or_above, heavy_below) with heavy_below <= "
                f"light_at_or_above, got {self.jpeg_quality}"
            )

    def of(self, step: str) -> tuple[float, float]:
        """The boundaries of ``step`` (see :data:`THRESHOLD_FIELDS`)."""
        return tuple(getattr(self, THRESHOLD_FIELDS[step]))


#: Step -> its LevelThresholds field.
THRESHOLD_FIELDS: dict[str, str] = {
    "blur": "blur_sigma",
    "downsample": "downsample_factor",
    "noise": "noise_sigma",
    "compression": "jpeg_quality",
    "upsample": "upsample_factor",
}
#: Steps whose measure is heavier when smaller.
REVERSED_STEPS = frozenset({"compression"})


def _level_of(step: str, value: float, thresholds: LevelThresholds) -> str:
    first, second = thresholds.of(step)
    if step in REVERSED_STEPS:
        return "heavy" if value < second else "medium" if value < first else "light"
    return "light" if value < first else "medium" if value < second else "heavy"


# ----------------------------------------------------------------------------------------------------------------
# Record -> measures
# ----------------------------------------------------------------------------------------------------------------

#: sqrt(2 ln 2): a Gaussian of sigma s halves the amplitude at the frequency sqrt(2 ln 2) / s (radians/pixel).
_HALF_AMPLITUDE = math.sqrt(2.0 * math.log(2.0))


def _kernel_grid(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = kernel.shape[0] // 2
    axis = np.arange(-half, half + 1, dtype=np.float64)
    return np.meshgrid(axis, axis)


def kernel_variance(kernel: KernelParams) -> float:
    """Blur variance (pixels^2 of the image the kernel is applied to) of the kernel that is really applied:
    :func:`~vlcot_grpo.data.degradations.make_kernel` at its size, so shape (generalized / plateau beta) and
    truncation count.

    * Gaussian, generalized Gaussian and plateau kernels (non-negative): the second moment of the normalised
      kernel averaged over both axes, ``sum k (x^2 + y^2) / 2`` (rotation does not change it). For a Gaussian it
      is sigma^2; variances add exactly under convolution, which is how stages combine (:func:`blur_width`).
    * sinc: its second moment is no width (the truncated jinc's lobes make it swing in sign with the size: -15.6
      at 21 px, cutoff pi/5), so the sinc gets the variance of the Gaussian that halves the amplitude at the
      same frequency as the truncated kernel does (``sigma = sqrt(2 ln 2) / w50``); where the kernel does not
      halve any frequency up to pi, the Gaussian with the same response at pi. For a Gaussian this is sigma
      again, so both definitions agree where both apply.
    """
    weights = make_kernel(kernel).astype(np.float64)
    weights /= weights.sum()
    x, y = _kernel_grid(weights)
    if kernel.kind != "sinc":
        return float(((weights * x * x).sum() + (weights * y * y).sum()) / 2.0)
    return half_amplitude_sigma(weights.sum(axis=0)) ** 2


def half_amplitude_sigma(profile: np.ndarray) -> float:
    """Gaussian-equivalent sigma of a symmetric 1-D kernel from its frequency response (see kernel_variance)."""
    half = profile.shape[0] // 2
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    frequencies = np.linspace(0.0, math.pi, 1025)
    response = np.cos(np.outer(frequencies, offsets)) @ profile
    below = np.flatnonzero(response <= 0.5)
    if below.size == 0:
        at_nyquist = float(response[-1])
        return 0.0 if at_nyquist >= 1.0 else math.sqrt(-2.0 * math.log(at_nyquist)) / math.pi
    i = int(below[0])
    # Linear interpolation of the crossing between the last sample above 0.5 and the first at or below it.
    f0, f1, r0, r1 = frequencies[i - 1], frequencies[i], response[i - 1], response[i]
    crossing = f1 if r0 == r1 else f0 + (r0 - 0.5) / (r0 - r1) * (f1 - f0)
    return _HALF_AMPLITUDE / crossing


def kernel_blur_sigma(kernel: KernelParams) -> float:
    """``sqrt(kernel_variance(kernel))``: the kernel's effective blur width in pixels of the image it blurs."""
    return math.sqrt(kernel_variance(kernel))


def _pixel_area_ratio(record: DegradationRecord, size: tuple[int, int]) -> float:
    """(HR pixels per pixel of an image of ``size``)^2, geometric mean of the two axes."""
    return (record.hr_size[0] / size[0]) * (record.hr_size[1] / size[1])


def blur_width(record: DegradationRecord) -> float | None:
    """Effective blur width in HR pixels: ``sqrt`` of the summed :func:`kernel_variance` of the stage-1 blur (on
    the HR), the stage-2 blur (on stage 1's output: one of its pixels spans HR / stage-1 size HR pixels) and the
    final sinc filter (on the LR: one pixel spans HR / LR). None when none of the three was applied."""
    variance, applied = 0.0, False
    if record.first_stage.blur is not None:
        variance += kernel_variance(record.first_stage.blur)
        applied = True
    if record.second_stage.blur is not None:
        ratio = _pixel_area_ratio(record, record.first_stage.resize.out_size)
        variance += kernel_variance(record.second_stage.blur) * ratio
        applied = True
    if record.final.sinc is not None:
        variance += kernel_variance(record.final.sinc) * _pixel_area_ratio(record, record.lr_size)
        applied = True
    return math.sqrt(variance) if applied else None


def _widths(record: DegradationRecord) -> list[int]:
    """Image widths through the pipeline: HR, after stage 1, after stage 2, LR (the output resize left out: it is
    the same for every sample, the model's input canvas)."""
    return [
        record.hr_size[1],
        record.first_stage.resize.out_size[1],
        record.second_stage.resize.out_size[1],
        record.lr_size[1],
    ]


def downsample_factor(record: DegradationRecord) -> float:
    """HR width / the narrowest width the image passes through (>= the SR scale): detail finer than the
    narrowest point is gone, whatever is enlarged afterwards."""
    widths = _widths(record)
    return widths[0] / min(widths)


def upsample_factor(record: DegradationRecord) -> float | None:
    """LR width / the narrowest width before it, when that is below the LR width: the LR image is then an
    enlargement of a smaller image, which shows (interpolation blur, blocks). None otherwise: an enlargement that a
    later step shrinks again (a stage-1 "up" followed by the 4x reduction) leaves no trace in the LR."""
    widths = _widths(record)
    narrowest = min(widths[:-1])
    return widths[-1] / narrowest if narrowest < widths[-1] else None


def jpeg_strength(quality: float) -> float:
    """libjpeg's quantisation-table scale, in percent, for a JPEG ``quality``: ``5000 / q`` below 50, else
    ``200 - 2 q`` (q 95 -> 10, 75 -> 50, 50 -> 100, 30 -> 167). The quantisation steps, and so the error, grow
    with it."""
    quality = float(quality)
    return 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality


def jpeg_quality_of_strength(strength: float) -> float:
    """Inverse of :func:`jpeg_strength`."""
    return 5000.0 / strength if strength >= 100.0 else (200.0 - strength) / 2.0


def jpeg_attenuation(jpeg_width: int, later_widths: list[int]) -> float:
    """How much of a JPEG's error reaches the LR: ``min(1, narrowest later width / width at the JPEG) **
    JPEG_SHRINK_EXPONENT`` (a later reduction averages the 8x8 blocks away; an enlargement keeps them)."""
    ratio = min(1.0, min(later_widths) / jpeg_width)
    return ratio**JPEG_SHRINK_EXPONENT


#: Exponent of the shrink attenuation of JPEG error in :func:`effective_jpeg_quality`, measured by
#: ``benchmarks/degradation_levels.py`` (docs/rewards.md): Spearman with the JPEG error left in the LR 0.50 for the
#: final quality alone, 0.55 at exponent 1, 0.57 at 2, 0.58 from 3 to 8; 2 is the smallest on that plateau.
JPEG_SHRINK_EXPONENT = 2.0


def effective_jpeg_quality(record: DegradationRecord) -> float:
    """The JPEG quality that alone would leave about as much JPEG error in the LR as the record's JPEGs together.

    Each JPEG's :func:`jpeg_strength`, times :func:`jpeg_attenuation` (the stage-1 JPEG is followed by stage 2's
    and the final resize; the final JPEG, when it comes before the final resize, by that resize), combined as
    ``sqrt(s1^2 + s2^2)`` and turned back into a quality (:func:`jpeg_quality_of_strength`). Lower = heavier.
    """
    _, first_w, second_w, lr_w = _widths(record)
    strengths = []
    if record.first_stage.jpeg_quality is not None:
        attenuation = jpeg_attenuation(first_w, [second_w, lr_w])
        strengths.append(jpeg_strength(record.first_stage.jpeg_quality) * attenuation)
    if record.second_stage.jpeg_quality is not None:
        strengths.append(jpeg_strength(record.second_stage.jpeg_quality) * jpeg_attenuation(second_w, [lr_w]))
    final_width = lr_w if record.final.order == "resize_sinc_then_jpeg" else second_w
    strengths.append(jpeg_strength(record.final.jpeg_quality) * jpeg_attenuation(final_width, [lr_w]))
    return jpeg_quality_of_strength(math.sqrt(sum(s * s for s in strengths)))


def residual_noise(hr: np.ndarray | Image.Image, record: DegradationRecord) -> float:
    """The noise left in the LR image (0-255 units): std of the LR minus the LR replayed with the noise draws
    zeroed, both at ``lr_size`` (see :func:`~vlcot_grpo.data.degradations.apply_degradation_with_residual_noise`,
    which gives the LR image too)."""
    return apply_degradation_with_residual_noise(hr, record)[1]


#: Grey level of the flat image that :func:`noise_estimate` replays a record on.
_ESTIMATE_GREY = 0.5


def noise_estimate(record: DegradationRecord) -> float:
    """:func:`residual_noise` of the record replayed on a flat mid-grey HR image: the later blur, resizing, sinc
    and JPEG act on the noise as in the real replay, but brightness (Poisson noise), clipping and the content's
    interplay with JPEG do not. For when no HR image is at hand; datasets store the real :func:`residual_noise`."""
    grey = np.full((*record.hr_size, 3), _ESTIMATE_GREY, dtype=np.float32)
    return residual_noise(grey, record)


def degradation_measures(
    record: DegradationRecord, hr: np.ndarray | Image.Image | None = None, *, noise: float | None = None
) -> dict[str, float | None]:
    """The effective strength of every step (see the module table); None = the step was not applied.

    The noise measure is ``noise`` when given (a stored :func:`residual_noise`), else :func:`residual_noise` on
    ``hr`` when given, else :func:`noise_estimate` (record only).
    """
    if noise is None:
        noise = residual_noise(hr, record) if hr is not None else noise_estimate(record)
    downsample = downsample_factor(record)
    return {
        "blur": blur_width(record),
        "downsample": downsample if downsample > 1.0 else None,
        "noise": float(noise),
        "compression": effective_jpeg_quality(record),
        "upsample": upsample_factor(record),
    }


# ----------------------------------------------------------------------------------------------------------------
# Measures -> levels
# ----------------------------------------------------------------------------------------------------------------


def levels_from_measures(
    measures: dict[str, float | None], thresholds: LevelThresholds | None = None
) -> dict[str, str | None]:
    """Bucket :func:`degradation_measures` output into levels (None where the measure is None or missing)."""
    thresholds = thresholds or LevelThresholds()
    return {
        step: None if measures.get(step) is None else _level_of(step, float(measures[step]), thresholds)
        for step in STEPS
    }


def levels_from_record(
    record: DegradationRecord,
    thresholds: LevelThresholds | None = None,
    hr: np.ndarray | Image.Image | None = None,
    *,
    noise: float | None = None,
) -> dict[str, str | None]:
    """One level per step in :data:`STEPS` ("light" / "medium" / "heavy"), None where the step was not applied.

    Noise needs the image: pass the HR image (``hr``, replayed) or the stored residual noise (``noise``); with
    neither, the record-only :func:`noise_estimate` is used (see :func:`degradation_measures`).
    """
    return levels_from_measures(degradation_measures(record, hr, noise=noise), thresholds)


def label_columns(
    record: DegradationRecord, noise: float, thresholds: LevelThresholds | None = None
) -> dict[str, Any]:
    """The label columns of a dataset row (``degradation_measures``, ``degradation_levels``, ``degradation_text``,
    ``label_version``) from its record and residual noise; prepare-data and the relabelling share it, so that a
    relabelled row matches a freshly built one."""
    measures = degradation_measures(record, noise=noise)
    levels = levels_from_measures(measures, thresholds)
    return {
        "degradation_levels": levels,
        "degradation_text": levels_to_text(levels),
        "degradation_measures": measures,
        "label_version": LABEL_VERSION,
    }


# ----------------------------------------------------------------------------------------------------------------
# Levels -> text
# ----------------------------------------------------------------------------------------------------------------


def levels_to_text(levels: dict[str, str | None]) -> str:
    """Paper-style text, steps in :data:`STEPS` order, unapplied steps omitted:
    ``"medium blur, heavy downsample, heavy noise, light compression, light upsample"``."""
    unknown_steps = sorted(set(levels) - set(STEPS))
    if unknown_steps:
        raise ValueError(f"unknown degradation steps {unknown_steps}; expected some of {STEPS}")
    parts = []
    for step in STEPS:
        level = levels.get(step)
        if level is None:
            continue
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r} for step {step!r}; expected one of {LEVELS}")
        parts.append(f"{level} {step}")
    return ", ".join(parts)


def levels_agreement(predicted: dict[str, str | None], target: dict[str, str | None]) -> float:
    """Fraction of the steps of :data:`STEPS` on which two level dicts agree (missing keys count as None)."""
    return sum(predicted.get(step) == target.get(step) for step in STEPS) / len(STEPS)


# ----------------------------------------------------------------------------------------------------------------
# Text -> levels
# ----------------------------------------------------------------------------------------------------------------

#: Words naming each step (exact, lower-case words; "down-sampled" and "up scale" are joined before matching).
_STEP_WORDS: dict[str, str] = {
    "blur": "blur blurs blurry blurred blurring blurriness defocus defocused unsharp soft softness",
    "downsample": "downsample downsamples downsampled downsampling downscale downscaled downscaling downsize "
    "downsized downsizing subsample subsampled subsampling",
    "noise": "noise noises noisy noised grain grains grainy graininess",
    "compression": "compression compressed compress compressing jpeg jpg jpegs blocky blockiness",
    "upsample": "upsample upsamples upsampled upsampling upscale upscaled upscaling upsize upsized upsizing",
}
#: Single words that name a step and say it is absent.
_ABSENT_STEP_WORDS: dict[str, str] = {"noiseless": "noise", "uncompressed": "compression", "lossless": "compression"}
#: Words naming each level.
_LEVEL_WORDS: dict[str, str] = {
    "light": "light lightly slight slightly mild mildly low weak weakly minor minimal little subtle faint lightest "
    "mildest weakest slightest lowest",
    "medium": "medium moderate moderately mid middle intermediate average modest",
    "heavy": "heavy heavily strong strongly severe severely high intense intensely extreme significant "
    "substantial considerable heaviest strongest severest highest",
}
#: Adjectives of "... quality" (JPEG quality: high quality is light compression, low quality heavy). Elsewhere they
#: are unknown words ("bad noise" is unread).
_QUALITY_ADJECTIVES: dict[str, str] = {
    "light": "high good excellent great fine best",
    "medium": "medium moderate average mid middle intermediate decent fair reasonable acceptable",
    "heavy": "low poor bad terrible awful worst",
}
_QUALITY_NOUNS = frozenset({"quality", "qualities"})
#: Words that say a step is absent ("no noise", "not blurry", "noise-free", "neither blur nor noise").
_NEGATION_WORDS = frozenset({"no", "not", "without", "none", "zero", "free", "neither", "nor", "never", "absent"})
#: Degree words without a level: alone with a step they read as heavy ("very noisy"), with a level word they keep
#: it ("very light blur"), after a negation they make it unreadable ("not very noisy").
_INTENSIFIERS = frozenset({"very", "extremely", "highly", "really", "overly", "too", "exceptionally", "super"})
#: Comparatives say more or less than something unnamed: the step is reported unread ("less noise").
_COMPARATIVES = frozenset(
    """less more most least fewer lesser reduced increased higher lower stronger weaker heavier lighter milder
    greater bigger larger smaller worse better harsher softer sharper""".split()
)
#: Words that mark a number as a factor ("4x downsampling", "x2 upscale").
_FACTOR_WORDS = frozenset({"x", "times", "fold"})
#: Words a fragment may contain without being reported as unread ("The image shows: ...", "Gaussian noise").
_FILLER_WORDS = frozenset(
    """a an the this that these it its image images picture photo photograph input output lq lr hq is are was
    were be been has have had shows show showing contains contain containing suffers suffer from there of in on by
    to with and as follows following degradation degradations degraded types type kinds kind detected observed
    visible appears seems looks like level levels amount predicted estimated some any also quite rather fairly
    somewhat pretty bit lot degree strength overall noticeable apparent present gaussian poisson shot sensor
    film color colour chroma chromatic luminance grey gray random motion lens optical camera artifacts artefacts
    artifact artefact effect effects blocks blocking ringing halo bicubic bilinear nearest area interpolation
    interpolated resolution factor quality qualities q""".split()
)

_STEP_OF_WORD = {word: step for step, words in _STEP_WORDS.items() for word in words.split()}
_STEP_OF_WORD.update(_ABSENT_STEP_WORDS)
_LEVEL_OF_WORD = {word: level for level, words in _LEVEL_WORDS.items() for word in words.split()}
_QUALITY_LEVEL_OF_WORD = {word: level for level, words in _QUALITY_ADJECTIVES.items() for word in words.split()}
_ABSENT = "absent"

#: "down-sampled", "up scale", "sub_sampling" -> one word.
_SPLIT_PREFIX = re.compile(r"\b(down|up|sub)[\s_-]+(sampl|scal|siz)", re.IGNORECASE)
#: Fragment boundaries: punctuation and a few joining words.
#: Not the colon: "blur: heavy" is one fragment, and "The image shows: heavy blur" reads fine as extra words.
_FRAGMENT_SEPARATORS = re.compile(
    r"[,;.!?\n/&+|]|\band\b|\bwith\b|\bplus\b|\bthen\b|\bbut\b|\bwhile\b|\bwhereas\b|\balthough\b",
    re.IGNORECASE,
)
#: Words and numbers ("4x" -> "4", "x"; "q=40" -> "q", "40"). Letters of any script; accents are removed first.
_TOKEN = re.compile(r"[^\W\d_]+|\d+(?:\.\d+)?")


@dataclass
class ParsedLevels:
    """What :func:`parse_degradation_text` read.

    ``levels`` has every step of :data:`STEPS`: a level, or None when the text does not name the step (or says it
    is absent). ``unread`` lists the fragments it could not interpret: a level with no step ("heavy"), a step with
    conflicting levels ("light heavy blur"), a step named twice with different levels, a negated level ("not heavy
    noise"), a comparative ("less noise"), an unknown word right before a step ("awful noise"), a number it has no
    unit for ("blur 3"), or a fragment of unknown words. A step in an unread fragment counts as not named.
    """

    levels: dict[str, str | None]
    unread: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every fragment was understood and at least one step was named."""
        return not self.unread and any(level is not None for level in self.levels.values())


def _normalise(text: str) -> str:
    """Accents off ("légère" -> "legere"), "n't" -> " not", "×" -> " x ", hyphenated prefixes joined."""
    decomposed = unicodedata.normalize("NFKD", text)
    text = "".join(char for char in decomposed if not unicodedata.combining(char))
    text = re.sub(r"n['\u2019]t\b", " not", text, flags=re.IGNORECASE)
    text = text.replace("\u00d7", " x ")
    return _SPLIT_PREFIX.sub(r"\1\2", text)


@dataclass
class _Token:
    text: str
    kind: str  # step | level | quality | negation | intensifier | comparative | number | factor | filler | unknown
    value: str | float | None = None


def _classify(words: list[str]) -> list[_Token]:
    tokens = []
    for word in words:
        if word in _STEP_OF_WORD:
            tokens.append(_Token(word, "step", _STEP_OF_WORD[word]))
        elif re.fullmatch(r"\d+(?:\.\d+)?", word):
            tokens.append(_Token(word, "number", float(word)))
        elif word in _NEGATION_WORDS:
            tokens.append(_Token(word, "negation"))
        elif word in _LEVEL_OF_WORD:
            tokens.append(_Token(word, "level", _LEVEL_OF_WORD[word]))
        elif word in _INTENSIFIERS:
            tokens.append(_Token(word, "intensifier"))
        elif word in _COMPARATIVES:
            tokens.append(_Token(word, "comparative"))
        elif word in _FILLER_WORDS:
            tokens.append(_Token(word, "filler"))
        else:
            tokens.append(_Token(word, "unknown"))
    return _merge_phrases(tokens)


def _merge_phrases(tokens: list[_Token]) -> list[_Token]:
    """Quality phrases and factors become one token each:

    * "<adjective> quality" (optionally "very high quality"): a quality level, the right way round for JPEG
      ("high quality" = light compression); a comparative before "quality" ("better quality") stays a comparative;
    * "quality [of|is] N", "q N": a JPEG quality number, bucketed with the compression thresholds;
    * "N x", "x N", "N times", "N fold": a resize factor, bucketed with the downsample / upsample thresholds.
    """
    merged: list[_Token] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.text in _QUALITY_NOUNS or token.text == "q":
            j = i + 1
            while j < len(tokens) and tokens[j].text in ("of", "is", "at", "factor"):
                j += 1
            if j < len(tokens) and tokens[j].kind == "number":
                merged.append(_Token(f"{token.text} {tokens[j].text}", "quality", float(tokens[j].value)))
                i = j + 1
                continue
            if token.text in _QUALITY_NOUNS and merged:
                previous = merged[-1]
                adjective = _QUALITY_LEVEL_OF_WORD.get(previous.text)
                if adjective is not None and previous.kind in ("level", "unknown"):
                    merged.pop()
                    while merged and merged[-1].kind == "intensifier":
                        merged.pop()
                    merged.append(_Token(f"{previous.text} {token.text}", "quality", adjective))
                    i += 1
                    continue
        if token.kind == "number" and i + 1 < len(tokens) and tokens[i + 1].text in _FACTOR_WORDS:
            merged.append(_Token(f"{token.text}{tokens[i + 1].text}", "factor", float(token.value)))
            i += 2
            continue
        if token.text == "x" and i + 1 < len(tokens) and tokens[i + 1].kind == "number":
            merged.append(_Token(f"x{tokens[i + 1].text}", "factor", float(tokens[i + 1].value)))
            i += 2
            continue
        merged.append(token)
        i += 1
    return merged


_MODIFIERS = frozenset({"level", "quality", "negation", "intensifier", "comparative", "number", "factor"})


def _attach(tokens: list[_Token]) -> dict[str, list[_Token]]:
    """Attach every modifier to the nearest step word (ties go to the following step, as adjectives precede nouns
    in "medium blur heavy noise"); "no blur or noise" negates both. Returns {step: its modifiers}."""
    positions = [i for i, token in enumerate(tokens) if token.kind == "step"]
    attached: dict[str, list[_Token]] = {tokens[i].value: [] for i in positions}
    if not positions:
        return attached
    for i, token in enumerate(tokens):
        if token.kind in _MODIFIERS:
            nearest = min(positions, key=lambda position: (abs(position - i), position < i))
            attached[tokens[nearest].value].append(token)
    for token in tokens:
        if token.kind == "step" and token.text in _ABSENT_STEP_WORDS:
            attached[token.value].append(_Token(token.text, "negation"))
    # "no blur or noise": a negation carries over "or" to the next step when that one has no modifier of its own.
    for a, b in zip(positions, positions[1:]):
        between = [tokens[k].text for k in range(a + 1, b)]
        first, second = tokens[a].value, tokens[b].value
        negated = any(m.kind == "negation" for m in attached[first])
        if negated and between and set(between) <= {"or", "nor"} and not attached[second]:
            attached[second].append(_Token("or", "negation"))
    return attached


def _number_level(step: str, token: _Token, thresholds: LevelThresholds) -> str | None:
    """A quality number (compression) or a factor (downsample / upsample) bucketed like the labels; None when the
    number does not fit the step."""
    value = float(token.value)
    if token.kind == "quality" and step == "compression" and 1 <= value <= 100:
        return _level_of(step, value, thresholds)
    if token.kind == "factor" and step in ("downsample", "upsample") and value > 1:
        return _level_of(step, value, thresholds)
    return None


def _step_level(
    step: str, modifiers: list[_Token], preceded_by_unknown: bool, thresholds: LevelThresholds
) -> str | None:
    """The level (or _ABSENT) that a step's modifiers say; None when they say nothing readable."""
    kinds = {m.kind for m in modifiers}
    if "comparative" in kinds or "number" in kinds:
        return None
    levels = set()
    for m in modifiers:
        if m.kind == "level":
            levels.add(m.value)
        elif m.kind == "quality":
            if step != "compression":
                return None  # "high quality noise": quality is a JPEG word
            levels.add(m.value if isinstance(m.value, str) else _number_level(step, m, thresholds))
        elif m.kind == "factor":
            levels.add(_number_level(step, m, thresholds))
    if None in levels:
        return None
    if "negation" in kinds:
        # "no noise" is absent; "not heavy noise", "not very noisy" say only what it is not.
        return _ABSENT if not levels and "intensifier" not in kinds else None
    if len(levels) > 1:
        return None  # "light heavy blur": contradictory
    if levels:
        return next(iter(levels))
    if "intensifier" in kinds:
        return "heavy"  # "very noisy"
    if preceded_by_unknown:
        return None  # "awful noise": an adjective we do not know; never guess medium
    return DEFAULT_LEVEL


def parse_degradation_text(text: str, thresholds: LevelThresholds | None = None) -> ParsedLevels:
    """Read levels from degradation text such as the paper's "medium blur, downsample, heavy noise, ...".

    Tolerates any order, case, accents and punctuation, extra words ("The image shows very heavy noise"), synonyms
    (strong / severe / high -> heavy, mild / slight / low / weak -> light, moderate -> medium, "blurry", "noisy",
    "jpeg" / "compressed", "downscaled", "up-sampling", ...). Reads the right way round:

    * negations: "no noise", "not blurry", "isn't blurry", "without upsampling", "noise-free", "neither blur nor
      noise", "no blur or noise" (absent); a negated level ("not heavy noise", "not very noisy") is unread;
    * quality words: "high quality jpeg" is light compression, "low-quality compression" heavy, "JPEG quality 40"
      is bucketed with the compression thresholds (as are factors: "4x downsampling"); quality words on another
      step are unread;
    * degree words: "very noisy" is heavy; comparatives ("less noise", "more blur", "heavier blur") are unread.

    A step named without a level gets :data:`DEFAULT_LEVEL` ("medium"), as the paper writes "downsample" and
    "upsample" bare, unless an unknown word stands right before it ("awful noise": unread). Everything it could not
    read is listed in ``unread``; nothing is given a level silently. ``thresholds`` (default
    :class:`LevelThresholds`) bucket the numbers.
    """
    thresholds = thresholds or LevelThresholds()
    levels: dict[str, str | None] = {step: None for step in STEPS}
    seen: set[str] = set()
    unread: list[str] = []
    for raw_fragment in _FRAGMENT_SEPARATORS.split(_normalise(text)):
        fragment = " ".join(raw_fragment.split())
        tokens = _classify(_TOKEN.findall(fragment.lower()))
        if not tokens:
            continue
        attached = _attach(tokens)
        if not attached:
            # No step named: harmless filler ("the image shows") or something we cannot read ("heavy", "haze").
            if any(token.kind != "filler" for token in tokens):
                unread.append(fragment)
            continue
        unknown_before = {
            tokens[i + 1].value
            for i in range(len(tokens) - 1)
            if tokens[i].kind == "unknown" and tokens[i + 1].kind == "step"
        }
        fragment_ok = True
        for step, modifiers in attached.items():
            level = _step_level(step, modifiers, step in unknown_before, thresholds)
            if level is None:
                fragment_ok = False
                continue
            value = None if level == _ABSENT else level
            if step in seen and levels[step] != value:
                fragment_ok = False  # named twice with different levels: keep the first
                continue
            levels[step] = value
            seen.add(step)
        if not fragment_ok:
            unread.append(fragment)
    return ParsedLevels(levels=levels, unread=unread)
