"""Degradation levels: from a parameter record to "light / medium / heavy" per step, to text, and back.

The VLCoT ``<degradation>`` block names one level per pipeline step, e.g.
"medium blur, heavy downsample, heavy noise, light compression, light upsample". This module

* measures each step's strength from a :class:`~vlcot_grpo.data.degradations.DegradationRecord`
  (:func:`degradation_measures`) and buckets it with :class:`LevelThresholds` (:func:`levels_from_record`);
* renders levels as text (:func:`levels_to_text`);
* parses such text back, tolerating order, case, punctuation, extra words and synonyms
  (:func:`parse_degradation_text`), and reports the fragments it could not read.

What each step measures (all sizes are widths; "HR pixels" = pixels of the high-resolution image, which is also
the canvas the model sees the LR image on):

============  ===========================================================================  ==================
step          measure                                                                      applied when
============  ===========================================================================  ==================
blur          equivalent Gaussian sigma of the stage-1 and stage-2 blur kernels, in HR       a stage blurred
              pixels, combined as ``sqrt(s1^2 + s2^2)`` (Gaussian family:
              ``sqrt((sigma_x^2 + sigma_y^2) / 2)``; sinc: ``sqrt(2 ln 2) / cutoff``, the
              Gaussian with the same half-amplitude frequency). The final sinc filter is
              left out: it imitates ringing, not blur.
downsample    HR width / the narrowest width the image passes through (>= the SR scale)    the factor is > 1
noise         noise standard deviation in 0-255 units as seen at the LR size: each stage's   always (both stages
              sigma (Poisson: its std on a mid-grey image, ``scale * 255 * sqrt(0.5 /      add noise)
              256)``) times ``min(1, LR width / width where it was added)`` (averaging by
              a later downscale shrinks it), combined as ``sqrt(n1^2 + n2^2)``
compression   quality of the final JPEG (the one at the LR size; stage-1 JPEG artefacts      always
              are mostly resized away). Lower quality = heavier.
upsample      the largest enlargement factor of one resize step inside the pipeline         some step enlarges
              (stage 1, stage 2, final resize to the LR size). The optional last resize to
              the output canvas is the same for every sample, so it is not counted.
============  ===========================================================================  ==================

The default thresholds split the default Real-ESRGAN sampler (scale 4) roughly into thirds where the measure
varies (blur, noise, compression, upsample); downsample is "light" whenever the image never goes below the LR size
by much, which is the common case.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from vlcot_grpo.data.degradations import DegradationRecord, KernelParams, NoiseParams

#: Pipeline steps, in the order of the paper's degradation text.
STEPS: tuple[str, ...] = ("blur", "downsample", "noise", "compression", "upsample")
#: Levels, from weakest to strongest.
LEVELS: tuple[str, ...] = ("light", "medium", "heavy")
#: Level given to a step that the text names without a level (the paper writes "downsample", "upsample").
DEFAULT_LEVEL = "medium"


# ----------------------------------------------------------------------------------------------------------------
# Record -> measures -> levels
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LevelThresholds:
    """Bucket boundaries ``(light_below, heavy_from)``: below the first -> light, from the second on -> heavy,
    in between -> medium. For JPEG quality the direction is reversed (lower quality is heavier)."""

    blur_sigma: tuple[float, float] = field(
        default=(1.5, 2.5), metadata={"help": "Equivalent Gaussian blur sigma in HR pixels."}
    )
    downsample_factor: tuple[float, float] = field(
        default=(5.0, 8.0), metadata={"help": "HR width / narrowest width in the pipeline."}
    )
    noise_sigma: tuple[float, float] = field(
        default=(12.0, 20.0), metadata={"help": "Noise standard deviation at the LR size, 0-255 units."}
    )
    jpeg_quality: tuple[float, float] = field(
        default=(75.0, 50.0),
        metadata={"help": "Final JPEG quality (light_at_or_above, heavy_below): >= 75 light, < 50 heavy."},
    )
    upsample_factor: tuple[float, float] = field(
        default=(1.25, 2.0), metadata={"help": "Largest enlargement factor of one resize step."}
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


def kernel_blur_sigma(kernel: KernelParams) -> float:
    """Equivalent Gaussian sigma (pixels of the image the kernel is applied to); see the module table."""
    if kernel.kind == "sinc":
        return math.sqrt(2.0 * math.log(2.0)) / float(kernel.cutoff)
    sigma_x = float(kernel.sigma_x)
    sigma_y = float(kernel.sigma_y if kernel.sigma_y is not None else sigma_x)
    return math.sqrt((sigma_x**2 + sigma_y**2) / 2.0)


def noise_sigma(noise: NoiseParams) -> float:
    """Noise standard deviation in 0-255 units (Poisson: on a mid-grey image, 256 photon levels)."""
    if noise.kind == "gaussian":
        return float(noise.sigma)
    return float(noise.scale) * 255.0 * math.sqrt(0.5 / 256.0)


def degradation_measures(record: DegradationRecord) -> dict[str, float | None]:
    """The raw strength of every step (see the module table); None = the step was not applied."""
    hr_width = record.hr_size[1]
    lr_width = record.lr_size[1]
    first_width = record.first_stage.resize.out_size[1]
    second_width = record.second_stage.resize.out_size[1]

    blur_variance = 0.0
    blurred = False
    if record.first_stage.blur is not None:
        blur_variance += kernel_blur_sigma(record.first_stage.blur) ** 2
        blurred = True
    if record.second_stage.blur is not None:
        # Stage 2 blurs stage 1's output; one of its pixels spans hr_width / first_width HR pixels.
        blur_variance += (kernel_blur_sigma(record.second_stage.blur) * hr_width / first_width) ** 2
        blurred = True

    narrowest = min(hr_width, first_width, second_width, lr_width)
    downsample = hr_width / narrowest

    first_noise = noise_sigma(record.first_stage.noise) * min(1.0, lr_width / first_width)
    second_noise = noise_sigma(record.second_stage.noise) * min(1.0, lr_width / second_width)

    enlargements = [first_width / hr_width, second_width / first_width, lr_width / second_width]
    upsample = max(enlargements)

    return {
        "blur": math.sqrt(blur_variance) if blurred else None,
        "downsample": downsample if downsample > 1.0 else None,
        "noise": math.hypot(first_noise, second_noise),
        "compression": float(record.final.jpeg_quality),
        "upsample": upsample if upsample > 1.0 else None,
    }


def _bucket(value: float, light_below: float, heavy_from: float) -> str:
    if value < light_below:
        return "light"
    return "medium" if value < heavy_from else "heavy"


def levels_from_measures(
    measures: dict[str, float | None], thresholds: LevelThresholds | None = None
) -> dict[str, str | None]:
    """Bucket :func:`degradation_measures` output into levels."""
    thresholds = thresholds or LevelThresholds()
    ranges = {
        "blur": thresholds.blur_sigma,
        "downsample": thresholds.downsample_factor,
        "noise": thresholds.noise_sigma,
        "upsample": thresholds.upsample_factor,
    }
    levels: dict[str, str | None] = {}
    for step in STEPS:
        value = measures.get(step)
        if value is None:
            levels[step] = None
        elif step == "compression":
            light_from, heavy_below = thresholds.jpeg_quality
            levels[step] = "heavy" if value < heavy_below else "medium" if value < light_from else "light"
        else:
            levels[step] = _bucket(value, *ranges[step])
    return levels


def levels_from_record(record: DegradationRecord, thresholds: LevelThresholds | None = None) -> dict[str, str | None]:
    """One level per step in :data:`STEPS` ("light" / "medium" / "heavy"), None where the step was not applied."""
    return levels_from_measures(degradation_measures(record), thresholds)


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
    "blur": "blur blurs blurry blurred blurring blurriness defocus defocused",
    "downsample": "downsample downsamples downsampled downsampling downscale downscaled downscaling downsize "
    "downsized downsizing subsample subsampled subsampling",
    "noise": "noise noises noisy noised grain grainy graininess",
    "compression": "compression compressed compress compressing jpeg jpg blocky blockiness",
    "upsample": "upsample upsamples upsampled upsampling upscale upscaled upscaling upsize upsized upsizing",
}
#: Words naming each level.
_LEVEL_WORDS: dict[str, str] = {
    "light": "light lightly slight slightly mild mildly low weak weakly minor minimal little subtle faint",
    "medium": "medium moderate moderately mid middle intermediate average modest",
    "heavy": "heavy heavily strong strongly severe severely high intense extreme significant substantial considerable",
}
#: Words that say a step is absent ("no noise", "without upsampling").
_ABSENT_WORDS = frozenset({"no", "without", "none", "zero"})
_ABSENT = "absent"
#: Words a fragment may consist of without being reported as unread ("The image shows: ...").
_FILLER_WORDS = frozenset(
    """a an the this that these it its image images picture photo photograph input output lq lr hq is are was
    were be been has have had shows show showing contains contain containing suffers suffer from there of in on by
    to with and as follows following degradation degradations degraded types type kinds kind detected observed
    visible appears seems looks like level levels amount predicted estimated""".split()
)

_STEP_OF_WORD = {word: step for step, words in _STEP_WORDS.items() for word in words.split()}
_LEVEL_OF_WORD = {word: level for level, words in _LEVEL_WORDS.items() for word in words.split()}
_LEVEL_OF_WORD.update({word: _ABSENT for word in _ABSENT_WORDS})

#: "down-sampled", "up scale", "sub_sampling" -> one word.
_SPLIT_PREFIX = re.compile(r"\b(down|up|sub)[\s_-]+(sampl|scal|siz)", re.IGNORECASE)
#: Fragment boundaries: punctuation and a few joining words.
#: Not the colon: "blur: heavy" is one fragment, and "The image shows: heavy blur" reads fine as extra words.
_FRAGMENT_SEPARATORS = re.compile(r"[,;.!?\n/&+|]|\band\b|\bwith\b|\bplus\b|\bthen\b", re.IGNORECASE)


@dataclass
class ParsedLevels:
    """What :func:`parse_degradation_text` read.

    ``levels`` has every step of :data:`STEPS`: a level, or None when the text does not name the step (or says it
    is absent). ``unread`` lists the fragments it could not interpret: a level with no step ("heavy"), a step with
    conflicting levels ("light heavy blur"), a step named twice with different levels, or unknown words.
    """

    levels: dict[str, str | None]
    unread: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every fragment was understood and at least one step was named."""
        return not self.unread and any(level is not None for level in self.levels.values())


def _words(fragment: str) -> list[str]:
    return re.findall(r"[a-z]+", fragment.lower())


def _levels_per_step(words: list[str]) -> dict[str, set[str]]:
    """Attach every level word to the nearest step word (ties go to the following step, as adjectives precede
    nouns in "medium blur heavy noise"); returns {step: levels attached to any of its words}."""
    step_positions = [i for i, word in enumerate(words) if word in _STEP_OF_WORD]
    attached: dict[str, set[str]] = {_STEP_OF_WORD[words[i]]: set() for i in step_positions}
    if not step_positions:
        return attached
    for i, word in enumerate(words):
        level = _LEVEL_OF_WORD.get(word)
        if level is None:
            continue
        nearest = min(step_positions, key=lambda position: (abs(position - i), position < i))
        attached[_STEP_OF_WORD[words[nearest]]].add(level)
    return attached


def parse_degradation_text(text: str) -> ParsedLevels:
    """Read levels from degradation text such as the paper's "medium blur, downsample, heavy noise, ...".

    Tolerates any order, case and punctuation, extra words ("The image shows very heavy noise"), synonyms
    (strong / severe / high -> heavy, mild / slight / low / weak -> light, moderate -> medium, "blurry", "noisy",
    "jpeg" / "compressed", "downscaled", "up-sampling", ...) and "no X" / "without X" (X absent). A step named
    without a level gets :data:`DEFAULT_LEVEL` ("medium"), as the paper writes "downsample" and "upsample" bare.
    """
    levels: dict[str, str | None] = {step: None for step in STEPS}
    seen: set[str] = set()
    unread: list[str] = []
    normalised = _SPLIT_PREFIX.sub(r"\1\2", text)
    for raw_fragment in _FRAGMENT_SEPARATORS.split(normalised):
        fragment = " ".join(raw_fragment.split())
        words = _words(fragment)
        if not words:
            continue
        attached = _levels_per_step(words)
        if not attached:
            # No step named: harmless filler ("the image shows") or something we cannot read ("heavy", "haze").
            if not all(word in _FILLER_WORDS for word in words):
                unread.append(fragment)
            continue
        fragment_ok = True
        for step, found in attached.items():
            if len(found) > 1:
                fragment_ok = False  # "light heavy blur": contradictory
                continue
            level = next(iter(found)) if found else DEFAULT_LEVEL
            value = None if level == _ABSENT else level
            if step in seen and levels[step] != value:
                fragment_ok = False  # named twice with different levels: keep the first
                continue
            levels[step] = value
            seen.add(step)
        if not fragment_ok:
            unread.append(fragment)
    return ParsedLevels(levels=levels, unread=unread)
