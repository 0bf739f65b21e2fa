"""Degradation levels: record -> levels -> text -> levels, and a tolerant parser."""

import dataclasses
import math

import pytest

from vlcot_grpo.data import degradations as deg
from vlcot_grpo.data.levels import (
    LEVELS,
    STEPS,
    LevelThresholds,
    degradation_measures,
    levels_agreement,
    levels_from_record,
    levels_to_text,
    parse_degradation_text,
)


def base_record(**final_changes) -> deg.DegradationRecord:
    """A hand-made record for a 128x128 HR image (LR 32): known blur, no resizing tricks, known noise."""
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


def test_measures_of_a_known_record():
    measures = degradation_measures(base_record())
    assert measures["blur"] == pytest.approx(1.0)
    assert measures["downsample"] == pytest.approx(4.0)
    # Stage-1 noise is added at 128 px and averaged down 4x to the LR size; stage-2 noise at the LR size.
    assert measures["noise"] == pytest.approx(math.hypot(4.0 / 4, 3.0))
    assert measures["compression"] == 90
    assert measures["upsample"] is None
    assert levels_from_record(base_record()) == {
        "blur": "light",
        "downsample": "light",
        "noise": "light",
        "compression": "light",
        "upsample": None,
    }


def test_each_step_moves_with_its_parameter():
    record = base_record(jpeg_quality=40)
    assert levels_from_record(record)["compression"] == "heavy"
    assert levels_from_record(base_record(jpeg_quality=60))["compression"] == "medium"

    strong_noise = dataclasses.replace(
        record.second_stage, noise=deg.NoiseParams("gaussian", grey=True, seed=0, sigma=24.0)
    )
    assert levels_from_record(dataclasses.replace(record, second_stage=strong_noise))["noise"] == "heavy"
    poisson = dataclasses.replace(record.second_stage, noise=deg.NoiseParams("poisson", grey=False, seed=0, scale=1.5))
    assert levels_from_record(dataclasses.replace(record, second_stage=poisson))["noise"] == "medium"  # ~16.9

    blurry = dataclasses.replace(
        record.first_stage, blur=deg.KernelParams("aniso", 21, sigma_x=3.0, sigma_y=2.5, rotation=0.3)
    )
    assert levels_from_record(dataclasses.replace(record, first_stage=blurry))["blur"] == "heavy"

    # Stage 2 shrinks to 0.3 x LR (9 px), then the final resize enlarges it back to 32: heavy down and up.
    squeezed = dataclasses.replace(record.second_stage, resize=deg.ResizeParams("bilinear", (9, 9), "down", 0.3))
    levels = levels_from_record(dataclasses.replace(record, second_stage=squeezed))
    assert levels["downsample"] == "heavy"  # 128 / 9 = 14.2
    assert levels["upsample"] == "heavy"  # 32 / 9 = 3.6


def test_thresholds_are_configurable():
    record = base_record(jpeg_quality=60)
    assert levels_from_record(record)["compression"] == "medium"
    assert levels_from_record(record, LevelThresholds(jpeg_quality=(95, 70)))["compression"] == "heavy"
    assert levels_from_record(record, LevelThresholds(blur_sigma=(0.5, 0.9)))["blur"] == "heavy"
    with pytest.raises(ValueError, match="blur_sigma"):
        LevelThresholds(blur_sigma=(3.0, 1.0))


def test_default_levels_cover_every_level_and_skip_missing_upsampling():
    seen = {step: set() for step in STEPS}
    for seed in range(300):
        for step, level in levels_from_record(deg.sample_degradation(None, seed, 512, 4)).items():
            seen[step].add(level)
    for step in ("blur", "noise", "compression", "upsample", "downsample"):
        assert set(LEVELS) <= seen[step], step
    assert None in seen["upsample"]  # many pipelines never enlarge
    assert None not in seen["noise"] and None not in seen["compression"]


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
        levels = levels_from_record(deg.sample_degradation(None, seed, 256, 4))
        parsed = parse_degradation_text(levels_to_text(levels))
        assert parsed.levels == levels
        assert parsed.ok and parsed.unread == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Medium Blur; DOWNSAMPLE. heavy noise,light compression , upsample",
            {"blur": "medium", "downsample": "medium", "noise": "heavy", "compression": "light", "upsample": "medium"},
        ),
        ("upsample: light\nnoise HEAVY", {"upsample": "light", "noise": "heavy"}),
        ("Blur: strong. Noise: none. JPEG: mild.", {"blur": "heavy", "compression": "light"}),
        (
            "The image shows strong blurring and slight JPEG artifacts",
            {"blur": "heavy", "compression": "light"},
        ),
        (
            "heavily compressed, moderate noise, down-sampled, up scaling, no blur",
            {"compression": "heavy", "noise": "medium", "downsample": "medium", "upsample": "medium"},
        ),
        (
            "severe downscaling with mild upscaling plus a weak noisy look",
            {"downsample": "heavy", "upsample": "light", "noise": "light"},
        ),
        ("medium blur heavy noise", {"blur": "medium", "noise": "heavy"}),
        ("The degradations are: very high noise (grainy)", {"noise": "heavy"}),
        ("low-level blurriness, high compression", {"blur": "light", "compression": "heavy"}),
    ],
)
def test_parser_accepts_variations(text, expected):
    parsed = parse_degradation_text(text)
    assert parsed.levels == {step: expected.get(step) for step in STEPS}
    assert parsed.unread == [] and parsed.ok


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
