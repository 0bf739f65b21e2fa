"""Degradation levels: effective measures -> levels -> text -> levels, and a parser that reads the right way round."""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

from vlcot_grpo.data import degradations as deg
from vlcot_grpo.data.levels import (
    LEVELS,
    STEPS,
    LevelThresholds,
    blur_width,
    degradation_measures,
    effective_jpeg_quality,
    jpeg_quality_of_strength,
    jpeg_strength,
    kernel_blur_sigma,
    kernel_variance,
    levels_agreement,
    levels_from_measures,
    levels_from_record,
    levels_to_text,
    noise_estimate,
    parse_degradation_text,
    residual_noise,
    upsample_factor,
)

#: Fixed boundaries for the tests that check the direction of each measure, whatever the defaults become.
T = LevelThresholds(
    blur_sigma=(1.5, 2.5),
    downsample_factor=(5.0, 8.0),
    noise_sigma=(4.0, 8.0),
    jpeg_quality=(75.0, 50.0),
    upsample_factor=(1.25, 2.0),
)


def base_record(**final_changes) -> deg.DegradationRecord:
    """A hand-made record for a 128x128 HR image (LR 32): known blur, no resizing tricks, known noise, no USM."""
    keep_first = deg.ResizeParams("area", (128, 128), "keep", 1.0)
    keep_second = deg.ResizeParams("area", (32, 32), "keep", 1.0)
    first = deg.StageRecord(
        blur=deg.KernelParams("iso", 21, sigma_x=1.0, sigma_y=1.0, rotation=0.0),
        resize=keep_first,
        noise=deg.NoiseParams("gaussian", grey=False, seed=0, sigma=4.0),
        jpeg_quality=90,
    )
    second = deg.StageRecord(
        blur=None,
        resize=keep_second,
        noise=deg.NoiseParams("gaussian", grey=False, seed=1, sigma=3.0),
        jpeg_quality=None,
    )
    final = deg.FinalRecord("resize_sinc_then_jpeg", deg.ResizeParams("area", (32, 32), "down", 0.25), None, 90)
    final = dataclasses.replace(final, **final_changes)
    return deg.DegradationRecord((128, 128), 4, (32, 32), first, second, final, deg.ResizeParams("bicubic", (32, 32)))


def with_stage(record, name, **changes):
    return dataclasses.replace(record, **{name: dataclasses.replace(getattr(record, name), **changes)})


def grey(size=128, level=0.5):
    return np.full((size, size, 3), level, np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Blur: the width of the kernels actually applied
# ----------------------------------------------------------------------------------------------------------------


def test_kernel_variance_is_the_second_moment_of_the_kernel_applied():
    gaussian = deg.KernelParams("iso", 21, sigma_x=2.0, sigma_y=2.0, rotation=0.0)
    assert kernel_variance(gaussian) == pytest.approx(4.0, rel=1e-3)
    # Truncation counts: sigma 3 cut to 7x7 is much narrower than sigma 3.
    truncated = deg.KernelParams("iso", 7, sigma_x=3.0, sigma_y=3.0, rotation=0.0)
    assert kernel_blur_sigma(truncated) < 2.0
    # Shape counts: the plateau (sigma 1, beta 1, 21x21) is as wide as a heavy blur, and its width grows
    # with the window (heavy tails); label version 1 called it sigma 1.
    plateau = deg.KernelParams("plateau_iso", 21, sigma_x=1.0, sigma_y=1.0, rotation=0.0, beta=1.0)
    assert kernel_blur_sigma(plateau) == pytest.approx(3.70, abs=0.02)
    assert kernel_blur_sigma(dataclasses.replace(plateau, size=7)) == pytest.approx(1.51, abs=0.02)
    flat_top = deg.KernelParams("generalized_iso", 21, sigma_x=1.0, sigma_y=1.0, rotation=0.0, beta=4.0)
    assert kernel_blur_sigma(flat_top) < 0.7  # a steep flat-topped kernel is narrower than its sigma
    # Rotation does not change it: the average of both axes is half the trace.
    aniso = deg.KernelParams("aniso", 21, sigma_x=3.0, sigma_y=1.0, rotation=0.0)
    turned = dataclasses.replace(aniso, rotation=0.9)
    assert kernel_variance(turned) == pytest.approx(kernel_variance(aniso), rel=1e-2)  # the window's corners
    assert kernel_variance(aniso) == pytest.approx((9.0 + 1.0) / 2, rel=1e-2)


def grating_half_amplitude_frequency(kernel: np.ndarray) -> float:
    """Frequency (radians/pixel) at which blurring a horizontal cosine grating with the pipeline's own blur halves
    its amplitude (first crossing), measured on the image."""
    frequencies = np.linspace(0.01, math.pi, 400)
    x = np.arange(256, dtype=np.float64)
    previous = (0.0, 1.0)
    for frequency in frequencies:
        row = np.cos(frequency * x)
        image = np.repeat(np.repeat(row[None, :, None], 64, axis=0), 3, axis=2).astype(np.float32)
        out = deg.blur(image, kernel)[32, 64:192, 0].astype(np.float64)
        amplitude = float(np.dot(out, row[64:192]) / np.dot(row[64:192], row[64:192]))
        if amplitude <= 0.5:
            f0, a0 = previous
            return f0 + (a0 - 0.5) / (a0 - amplitude) * (frequency - f0)
        previous = (frequency, amplitude)
    return math.inf


@pytest.mark.parametrize(("size", "cutoff"), [(21, math.pi / 5), (13, math.pi / 3), (7, math.pi / 2), (21, 2.4)])
def test_sinc_width_is_that_of_the_gaussian_with_the_same_half_amplitude_frequency(size, cutoff):
    params = deg.KernelParams("sinc", size, cutoff=cutoff)
    measured = grating_half_amplitude_frequency(deg.make_kernel(params))
    assert kernel_blur_sigma(params) == pytest.approx(math.sqrt(2 * math.log(2)) / measured, rel=0.03)
    # The second moment is no width for a sinc: it can be negative.
    kernel = deg.make_kernel(deg.KernelParams("sinc", 21, cutoff=math.pi / 5)).astype(np.float64)
    axis = np.arange(-10, 11)
    assert (kernel.sum(0) * axis**2).sum() < 0


def test_sinc_and_gaussian_definitions_agree_on_a_gaussian():
    # kernel_variance's sinc rule applied to a Gaussian profile gives sigma back (they agree where both apply).
    from vlcot_grpo.data.levels import half_amplitude_sigma

    for sigma in (0.8, 1.5, 2.5):
        profile = deg.gaussian_kernel(31, sigma).astype(np.float64).sum(axis=0)
        assert half_amplitude_sigma(profile) == pytest.approx(sigma, rel=0.01)


def impulse_response_variance(image: np.ndarray, centre: int, reach: int) -> float:
    """Second moment (average of both axes) of an impulse response, inside the kernels' reach only (outside,
    OpenCV's float32 DFT leaves a ~1e-7 floor that the squared distances would amplify)."""
    weights = image[centre - reach : centre + reach + 1, centre - reach : centre + reach + 1, 0].astype(np.float64)
    weights /= weights.sum()
    rows, cols = np.indices(weights.shape)
    cy, cx = (weights * rows).sum(), (weights * cols).sum()
    return float(((weights * (cols - cx) ** 2).sum() + (weights * (rows - cy) ** 2).sum()) / 2)


def test_blur_variances_add_through_the_real_blur_ops():
    k1 = deg.KernelParams("plateau_aniso", 15, sigma_x=2.0, sigma_y=0.8, rotation=0.4, beta=1.3)
    k2 = deg.KernelParams("generalized_iso", 11, sigma_x=1.2, sigma_y=1.2, rotation=0.0, beta=0.7)
    image = np.zeros((81, 81, 3), np.float32)
    image[40, 40] = 1.0
    twice = deg.blur(deg.blur(image, deg.make_kernel(k1)), deg.make_kernel(k2))
    measured = impulse_response_variance(twice, 40, 7 + 5)
    assert measured == pytest.approx(kernel_variance(k1) + kernel_variance(k2), rel=0.01)


def test_blur_width_combines_stages_and_the_final_sinc_in_hr_pixels():
    record = base_record()
    assert blur_width(record) == pytest.approx(1.0, rel=1e-3)
    # Stage 2 blurs stage 1's output; at half the HR size one of its pixels spans 2 HR pixels.
    k2 = deg.KernelParams("iso", 21, sigma_x=1.0, sigma_y=1.0, rotation=0.0)
    halved = with_stage(record, "first_stage", resize=deg.ResizeParams("bilinear", (64, 64), "down", 0.5))
    halved = with_stage(halved, "second_stage", blur=k2)
    assert blur_width(halved) == pytest.approx(math.sqrt(1.0 + 4.0), rel=1e-3)
    # The final sinc acts on the LR: 4 HR pixels per pixel.
    sinc = deg.KernelParams("sinc", 13, cutoff=math.pi / 3)
    with_sinc = dataclasses.replace(record, final=dataclasses.replace(record.final, sinc=sinc))
    assert blur_width(with_sinc) == pytest.approx(math.sqrt(1.0 + 16 * kernel_variance(sinc)), rel=1e-3)
    nothing = with_stage(record, "first_stage", blur=None)
    assert blur_width(nothing) is None and degradation_measures(nothing, noise=0.0)["blur"] is None


# ----------------------------------------------------------------------------------------------------------------
# Noise: what survives to the LR
# ----------------------------------------------------------------------------------------------------------------


def test_residual_noise_is_the_std_of_the_lr_minus_its_noise_free_replay(photo):
    hr = np.asarray(photo.resize((128, 128)))
    record = base_record()
    noisy = deg.apply_degradation_array(hr, record, at_lr_size=True).astype(np.float64)
    quiet = deg.apply_degradation_array(hr, deg.without_noise(record), at_lr_size=True).astype(np.float64)
    assert residual_noise(hr, record) == pytest.approx(float(np.std(noisy - quiet)))
    silent = with_stage(
        with_stage(record, "first_stage", noise=dataclasses.replace(record.first_stage.noise, sigma=0.0)),
        "second_stage",
        noise=dataclasses.replace(record.second_stage.noise, sigma=0.0),
    )
    assert residual_noise(hr, silent) == 0.0
    # What comes after the noise removes some of it: a strong stage-2 blur after the stage-1 noise.
    loud_first = with_stage(silent, "first_stage", noise=deg.NoiseParams("gaussian", False, 0, sigma=20.0))
    blurred = with_stage(loud_first, "second_stage", blur=deg.KernelParams("iso", 21, sigma_x=2.0, sigma_y=2.0))
    assert residual_noise(grey(), blurred) < 0.7 * residual_noise(grey(), loud_first)


def test_poisson_noise_grows_with_brightness_and_the_estimate_uses_grey():
    record = with_stage(base_record(), "second_stage", noise=deg.NoiseParams("poisson", False, 5, scale=2.0))
    dark, bright = residual_noise(grey(level=0.1), record), residual_noise(grey(level=0.8), record)
    assert bright > 1.5 * dark
    assert noise_estimate(record) == pytest.approx(residual_noise(grey(level=0.5), record))
    assert degradation_measures(record)["noise"] == pytest.approx(noise_estimate(record))
    assert degradation_measures(record, grey(level=0.8))["noise"] == pytest.approx(bright)
    assert degradation_measures(record, noise=7.0)["noise"] == 7.0


# ----------------------------------------------------------------------------------------------------------------
# Compression, downsample, upsample
# ----------------------------------------------------------------------------------------------------------------


def test_jpeg_strength_and_effective_quality():
    for quality in (30, 49, 50, 75, 95):
        assert jpeg_quality_of_strength(jpeg_strength(quality)) == pytest.approx(quality)
    assert jpeg_strength(50) == 100 and jpeg_strength(30) > jpeg_strength(40) > jpeg_strength(90)
    # Stage-1 JPEG at 128 px, shrunk 4x before the LR: almost nothing of it is left; the final JPEG counts.
    assert effective_jpeg_quality(base_record()) == pytest.approx(90.0, abs=0.1)
    # A stage-1 JPEG kept at the LR size counts fully: two q=50 JPEGs are heavier than one.
    at_lr = with_stage(base_record(jpeg_quality=50), "first_stage", jpeg_quality=50)
    at_lr = with_stage(at_lr, "first_stage", resize=deg.ResizeParams("area", (32, 32), "down", 0.25))
    assert effective_jpeg_quality(at_lr) == pytest.approx(5000 / (100 * math.sqrt(2)))
    assert effective_jpeg_quality(dataclasses.replace(at_lr, first_stage=base_record().first_stage)) > 49


def test_downsample_and_upsample_count_what_the_lr_shows():
    record = base_record()
    measures = degradation_measures(record, noise=1.0)
    assert measures["downsample"] == pytest.approx(4.0) and measures["upsample"] is None
    # Stage 2 shrinks to 9 px, the final resize enlarges back to 32: heavy down and up.
    squeezed = with_stage(record, "second_stage", resize=deg.ResizeParams("bilinear", (9, 9), "down", 0.3))
    levels = levels_from_record(squeezed, T, noise=1.0)
    assert levels["downsample"] == "heavy"  # 128 / 9 = 14.2
    assert levels["upsample"] == "heavy" and upsample_factor(squeezed) == pytest.approx(32 / 9)
    # A stage-1 enlargement that the 4x reduction undoes leaves no trace: no upsample (label version 1 said 1.5).
    enlarged = with_stage(record, "first_stage", resize=deg.ResizeParams("bicubic", (192, 192), "up", 1.5))
    assert upsample_factor(enlarged) is None


def test_measures_of_a_known_record():
    measures = degradation_measures(base_record())
    assert measures["blur"] == pytest.approx(1.0, rel=1e-3)
    assert measures["downsample"] == pytest.approx(4.0)
    assert measures["noise"] == pytest.approx(residual_noise(grey(), base_record()))
    # JPEG and its chroma subsampling remove part of the 4 / 4 and 3 sigma of noise (sqrt(1 + 9) = 3.2).
    assert 0.5 < measures["noise"] < math.hypot(1.0, 3.0)
    assert measures["compression"] == pytest.approx(90.0, abs=0.1)
    assert measures["upsample"] is None
    assert levels_from_record(base_record()) == {
        "blur": "light",
        "downsample": "light",
        "noise": "light",
        "compression": "light",
        "upsample": None,
    }


def test_each_step_moves_with_its_parameter():
    record = base_record()
    assert levels_from_record(base_record(jpeg_quality=40), T)["compression"] == "heavy"
    assert levels_from_record(base_record(jpeg_quality=60), T)["compression"] == "medium"
    strong = with_stage(record, "second_stage", noise=deg.NoiseParams("gaussian", grey=True, seed=0, sigma=24.0))
    assert levels_from_record(strong, T)["noise"] == "heavy"
    assert levels_from_record(record, T)["noise"] == "light"
    blurry = with_stage(record, "first_stage", blur=deg.KernelParams("aniso", 21, sigma_x=3.0, sigma_y=2.5))
    assert levels_from_record(blurry, T, noise=1.0)["blur"] == "heavy"
    plateau = with_stage(
        record, "first_stage", blur=deg.KernelParams("plateau_iso", 21, sigma_x=1.0, sigma_y=1.0, beta=1.0)
    )
    assert levels_from_record(plateau, T, noise=1.0)["blur"] == "heavy"  # label version 1: light


def test_thresholds_are_configurable_and_checked():
    record = base_record(jpeg_quality=60)
    assert levels_from_record(record, T, noise=1.0)["compression"] == "medium"
    assert levels_from_record(record, LevelThresholds(jpeg_quality=(95, 70)), noise=1.0)["compression"] == "heavy"
    assert levels_from_record(record, LevelThresholds(blur_sigma=(0.5, 0.9)), noise=1.0)["blur"] == "heavy"
    assert levels_from_measures({"noise": 5.0}, T) == dict.fromkeys(STEPS) | {"noise": "medium"}
    with pytest.raises(ValueError, match="blur_sigma"):
        LevelThresholds(blur_sigma=(3.0, 1.0))
    with pytest.raises(ValueError, match="jpeg_quality"):
        LevelThresholds(jpeg_quality=(50.0, 75.0))


def test_default_levels_cover_every_level_and_skip_missing_upsampling():
    seen = {step: set() for step in STEPS}
    for seed in range(200):
        for step, level in levels_from_record(deg.sample_degradation(None, seed, 64, 4)).items():
            seen[step].add(level)
    for step in STEPS:
        assert set(LEVELS) <= seen[step], step
    assert None in seen["upsample"]  # most pipelines never go below the LR size
    assert None not in seen["noise"] and None not in seen["compression"]


def test_thresholds_table_in_the_docs_is_the_code_s():
    """docs/rewards.md lists the thresholds; they must be LevelThresholds' defaults (one source of truth)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "rewards.md").read_text()
    table = text[text.index("<!-- level thresholds -->") : text.index("<!-- /level thresholds -->")]
    defaults = LevelThresholds()
    found = {}
    for line in table.splitlines():
        match = re.match(r"\|\s*`(\w+)`\s*\|.*?\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", line)
        if match:
            found[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    assert found == {step: defaults.of(step) for step in STEPS}


# ----------------------------------------------------------------------------------------------------------------
# Levels -> text -> levels
# ----------------------------------------------------------------------------------------------------------------


def test_text_follows_the_paper_style():
    levels = {"blur": "medium", "downsample": "heavy", "noise": "heavy", "compression": "light", "upsample": "light"}
    assert levels_to_text(levels) == "medium blur, heavy downsample, heavy noise, light compression, light upsample"
    assert (
        levels_to_text({**levels, "upsample": None, "blur": None})
        == "heavy downsample, heavy noise, light compression"
    )
    with pytest.raises(ValueError, match="unknown level"):
        levels_to_text({"blur": "extreme"})
    with pytest.raises(ValueError, match="unknown degradation steps"):
        levels_to_text({"haze": "light"})


def test_levels_text_levels_round_trip():
    for seed in range(60):
        levels = levels_from_record(deg.sample_degradation(None, seed, 64, 4))
        parsed = parse_degradation_text(levels_to_text(levels))
        assert parsed.levels == levels
        assert parsed.ok and parsed.unread == []


#: (text, levels read, fragments reported unread). Every phrasing is read the right way round or reported.
PHRASINGS = [
    # The paper's style and tolerated variations.
    (
        "medium blur, downsample, heavy noise, light compression, upsample",
        {"blur": "medium", "downsample": "medium", "noise": "heavy", "compression": "light", "upsample": "medium"},
        [],
    ),
    (
        "Medium Blur; DOWNSAMPLE. heavy noise,light compression , upsample",
        {"blur": "medium", "downsample": "medium", "noise": "heavy", "compression": "light", "upsample": "medium"},
        [],
    ),
    ("upsample: light\nnoise HEAVY", {"upsample": "light", "noise": "heavy"}, []),
    ("Blur: strong. Noise: none. JPEG: mild.", {"blur": "heavy", "compression": "light"}, []),
    ("The image shows strong blurring and slight JPEG artifacts", {"blur": "heavy", "compression": "light"}, []),
    (
        "heavily compressed, moderate noise, down-sampled, up scaling, no blur",
        {"compression": "heavy", "noise": "medium", "downsample": "medium", "upsample": "medium"},
        [],
    ),
    (
        "severe downscaling with mild upscaling plus a weak noisy look",
        {"downsample": "heavy", "upsample": "light", "noise": "light"},
        [],
    ),
    ("medium blur heavy noise", {"blur": "medium", "noise": "heavy"}, []),
    ("The degradations are: very high noise (grainy)", {"noise": "heavy"}, []),
    ("low-level blurriness, high compression", {"blur": "light", "compression": "heavy"}, []),
    ("Gaussian noise, motion blur", {"noise": "medium", "blur": "medium"}, []),
    # Quality words: high quality is light compression, low quality heavy.
    ("high quality jpeg", {"compression": "light"}, []),
    ("high-quality JPEG compression", {"compression": "light"}, []),
    ("low-quality compression", {"compression": "heavy"}, []),
    ("very low quality jpeg, light noise", {"compression": "heavy", "noise": "light"}, []),
    ("poor quality compression", {"compression": "heavy"}, []),
    ("moderate quality jpeg", {"compression": "medium"}, []),
    ("JPEG quality 90", {"compression": "light"}, []),
    ("jpeg q=35", {"compression": "heavy"}, []),
    ("better quality jpeg", {}, ["better quality jpeg"]),
    ("high quality noise", {}, ["high quality noise"]),
    ("good quality", {}, ["good quality"]),
    # Negations.
    ("not blurry", {}, []),
    ("isn't blurry, heavy noise", {"noise": "heavy"}, []),
    ("no noise", {}, []),
    ("noise-free, light blur", {"blur": "light"}, []),
    ("noiseless image with heavy compression", {"compression": "heavy"}, []),
    ("without upsampling", {}, []),
    ("neither blur nor noise, heavy compression", {"compression": "heavy"}, []),
    ("no blur or noise", {}, []),
    ("heavy noise but not blurry", {"noise": "heavy"}, []),
    ("not heavy noise", {}, ["not heavy noise"]),
    ("not very noisy", {}, ["not very noisy"]),
    # Comparatives and degree words.
    ("less noise", {}, ["less noise"]),
    ("more blur, light noise", {"noise": "light"}, ["more blur"]),
    ("heavier blur", {}, ["heavier blur"]),
    ("very noisy", {"noise": "heavy"}, []),
    ("very light blur", {"blur": "light"}, []),
    # Accents are removed, not split into pieces.
    ("sévère noise, modéré blur", {"noise": "heavy"}, ["modere blur"]),
    ("Légère compression", {}, ["Legere compression"]),
    # Unknown adjectives and numbers without a unit are never read as a guessed medium.
    ("awful noise", {}, ["awful noise"]),
    ("blur sigma 3", {}, ["blur sigma 3"]),
    ("4x downsampling, x3 upscale", {"downsample": "light", "upsample": "heavy"}, []),
]


@pytest.mark.parametrize(("text", "expected", "unread"), PHRASINGS, ids=[p[0] for p in PHRASINGS])
def test_parser_phrasings(text, expected, unread):
    parsed = parse_degradation_text(text)
    assert parsed.levels == {step: expected.get(step) for step in STEPS}
    assert parsed.unread == unread
    assert parsed.ok == (not unread and bool(expected))


def test_parser_numbers_use_the_thresholds_table():
    strict = LevelThresholds(jpeg_quality=(95.0, 92.0), downsample_factor=(3.0, 3.5))
    assert parse_degradation_text("jpeg quality 90", strict).levels["compression"] == "heavy"
    assert parse_degradation_text("4x downsampling", strict).levels["downsample"] == "heavy"


def test_parser_reports_fragments_it_cannot_read():
    parsed = parse_degradation_text("heavy blur, some haze, extreme, light noise")
    assert parsed.levels["blur"] == "heavy" and parsed.levels["noise"] == "light"
    assert parsed.unread == ["some haze", "extreme"]
    assert not parsed.ok

    contradictory = parse_degradation_text("light heavy noise, medium blur")
    assert contradictory.levels["noise"] is None and contradictory.levels["blur"] == "medium"
    assert contradictory.unread == ["light heavy noise"]

    twice = parse_degradation_text("heavy blur, light blur, heavy blur")
    assert twice.levels["blur"] == "heavy"
    assert twice.unread == ["light blur"]

    assert not parse_degradation_text("").ok
    assert not parse_degradation_text("the image").ok  # filler only: nothing unread, but nothing read either
    assert parse_degradation_text("the image").unread == []


def test_levels_agreement_counts_matching_steps():
    truth = {"blur": "medium", "downsample": "light", "noise": "heavy", "compression": "light", "upsample": None}
    guess = parse_degradation_text("medium blur, light downsample, light noise, heavy compression").levels
    assert levels_agreement(guess, truth) == pytest.approx(3 / 5)
    assert levels_agreement(truth, truth) == 1.0
