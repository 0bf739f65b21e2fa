"""Rewards on hand-built completions of the tiny Emu3 model: exact values, the paper's worked examples, bad outputs.

Each completion is a real token sequence (``build_completion_ids``) parsed by ``parse_completions``, and every
reward receives what the trainer passes: ``vlcot`` parses, ``stage_texts``, ``stage_images`` and dataset columns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlcot_grpo.models import CODE
from vlcot_grpo.rewards import (
    DegradationReward,
    FidelityReward,
    FormatReward,
    GenerationReward,
    UnderstandingReward,
    load_rewards,
)
from vlcot_grpo.vlcot import build_completion_ids, parse_completions

GRIDS = {"rough": (2, 2), "middle": (4, 4), "final": (8, 8)}  # tiny backend: downsample 4 -> 8, 16, 32 px
TEXTS = {
    "degradation": "medium blur, downsample, heavy noise, light compression, upsample",
    "rough_understand": "This image shows the group of lions lying on a large rock, surrounded by open sky.",
    "middle_understand": "Lions with golden fur rest on a grey boulder.",
    "final_understand": "Fine fur texture and sharp rock edges.",
}


def codes(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {stage: torch.randint(0, backend.codebook_size, grid, generator=g) for stage, grid in GRIDS.items()}


def completion(backend, texts=None, seed=0):
    return build_completion_ids(backend, {**TEXTS, **(texts or {})}, codes(backend, seed))


def batch(backend, ids_list, decode=True, **columns):
    """The keyword arguments the trainer passes to a reward, for these completions (text-only tests skip decoding
    the images, which is most of the time here)."""
    parses = parse_completions(backend, ids_list, GRIDS, decode_images=decode)
    return dict(
        prompts=["prompt"] * len(ids_list),
        completions=[backend.decode_text(ids) for ids in ids_list],
        completion_ids=ids_list,
        vlcot=parses,
        stage_texts=[p.texts for p in parses],
        stage_images=[p.images for p in parses],
        **columns,
    )


def without_closing_tag(backend, ids, block):
    tag = backend.tag_ids[f"</{block}>"]
    return [t for t in ids if t != tag]


def without_image_row(backend, ids, block, row):
    """``ids`` with one row (its codes and its end-of-row token) cut out of the image block ``block``."""
    start = ids.index(backend.tag_ids[f"<{block}>"]) + 1
    rows, cols = GRIDS[block.removesuffix("_image")]
    template = backend.image_template(rows, cols).tolist()
    code_positions = [i for i, t in enumerate(template) if t == CODE]
    first, end = code_positions[row * cols], code_positions[(row + 1) * cols]
    return ids[: start + first] + ids[start + end :]


class Logs:
    """A stand-in for the trainer's ``log_metric``: records every call."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def __call__(self, name, value):
        self.values.setdefault(name, []).append(value)


# ----- format ----------------------------------------------------------------------------------------------------


def test_format_complete_completion_scores_one(tiny):
    backend = tiny[2]
    kwargs = batch(backend, [completion(backend)])
    assert kwargs["vlcot"][0].complete
    assert FormatReward()(**kwargs) == [1.0]
    assert FormatReward(partial_credit=True)(**kwargs) == [1.0]


def test_missing_final_image_close_tag(tiny):
    backend = tiny[2]
    ids = without_closing_tag(backend, completion(backend), "final_image")
    kwargs = batch(backend, [ids], lr_image=[Image.new("RGB", (8, 8))])
    assert FormatReward()(**kwargs) == [0.0]
    assert FormatReward(partial_credit=True)(**kwargs) == [pytest.approx(6 / 7)]
    assert GenerationReward(metrics=("entropy",), device="cpu")(**kwargs) == [None]
    assert FidelityReward()(**kwargs) == [None]


def test_image_block_with_a_missing_row(tiny):
    backend = tiny[2]
    ids = without_image_row(backend, completion(backend), "middle_image", row=1)
    kwargs = batch(backend, [ids])
    parse = kwargs["vlcot"][0]
    assert parse.images["middle"] is None and parse.images["final"] is not None
    assert FormatReward()(**kwargs) == [0.0]
    assert FormatReward(partial_credit=True)(**kwargs) == [pytest.approx(6 / 7)]


def test_format_partial_credit_counts_blocks_in_order_only(tiny):
    backend = tiny[2]
    tag, text = backend.tag_ids, backend.encode_text
    # <rough_understand> then <degradation>: only one of the two is in order; five blocks missing.
    ids = [tag["<rough_understand>"], *text("x"), tag["</rough_understand>"]]
    ids += [tag["<degradation>"], *text("light noise"), tag["</degradation>"]]
    kwargs = batch(backend, [ids])
    assert FormatReward()(**kwargs) == [0.0]
    assert FormatReward(partial_credit=True)(**kwargs) == [pytest.approx(1 / 7)]


# ----- degradation -----------------------------------------------------------------------------------------------

# The paper's worked example: 3 of 5 steps right. The text reads as medium blur, medium downsample (named bare),
# heavy noise, light compression, medium upsample; blur and upsample are wrong below.
PAPER_TRUTH = {"blur": "heavy", "downsample": "medium", "noise": "heavy", "compression": "light", "upsample": None}


def test_degradation_paper_example_three_of_five(tiny):
    backend = tiny[2]
    kwargs = batch(backend, [completion(backend)], decode=False, degradation_levels=[PAPER_TRUTH])
    assert DegradationReward()(**kwargs) == [pytest.approx(0.6)]
    # Graded: medium for heavy blur earns 0.5, upsample present for absent earns 0 -> (0.5 + 1 + 1 + 1 + 0) / 5.
    assert DegradationReward(graded=True)(**kwargs) == [pytest.approx(0.7)]


def test_degradation_absent_steps_left_unnamed_are_right(tiny):
    backend = tiny[2]
    ids = completion(backend, {"degradation": "heavy noise"})
    truth = {"blur": None, "downsample": None, "noise": "heavy", "compression": None, "upsample": None}
    wrong = dict(truth, noise="light")
    kwargs = batch(backend, [ids, ids], decode=False, degradation_levels=[truth, wrong])
    assert DegradationReward()(**kwargs) == [1.0, pytest.approx(0.8)]
    assert DegradationReward(graded=True)(**kwargs) == [1.0, pytest.approx(0.8)]


def test_degradation_unreadable_and_missing_text_score_zero_with_reasons(tiny):
    backend = tiny[2]
    unreadable = completion(backend, {"degradation": "purple elephants everywhere"})
    partly = completion(backend, {"degradation": "heavy noise, purple haze"})
    missing = without_closing_tag(backend, completion(backend), "degradation")
    truth = {"noise": "heavy"}
    logs = Logs()
    kwargs = batch(
        backend, [unreadable, partly, missing], decode=False, degradation_levels=[truth] * 3, log_metric=logs
    )
    assert DegradationReward()(**kwargs) == [0.0, 1.0, 0.0]
    assert logs.values["degradation/unreadable"] == [1.0]
    assert logs.values["degradation/partly_unread"] == [1.0]
    assert logs.values["degradation/missing"] == [1.0]


def test_degradation_without_recorded_levels_is_not_applicable(tiny):
    backend = tiny[2]
    kwargs = batch(backend, [completion(backend)], decode=False, degradation_levels=[None])
    assert DegradationReward()(**kwargs) == [None]
    kwargs = batch(
        backend, [completion(backend)], decode=False
    )  # no column at all, no log_metric: outside the trainer
    assert DegradationReward()(**kwargs) == [None]


def test_degradation_rejects_a_bad_recorded_level(tiny):
    backend = tiny[2]
    kwargs = batch(backend, [completion(backend)], decode=False, degradation_levels=[{"noise": "extreme"}])
    with pytest.raises(ValueError, match="'noise'.*'extreme'"):
        DegradationReward()(**kwargs)


# ----- understanding ---------------------------------------------------------------------------------------------


def test_understanding_paper_example_three_of_four(tiny):
    backend = tiny[2]
    kwargs = batch(backend, [completion(backend)], decode=False, tags=[["lion", "rock", "sky", "tree"]])
    assert UnderstandingReward()(**kwargs) == [0.75]


def test_understanding_cat_is_not_catalogue(tiny):
    backend = tiny[2]
    ids = [
        completion(backend, {"rough_understand": "A catalogue lies on the table."}),
        completion(backend, {"rough_understand": "Two Cats sleep on a catalogue."}),
        completion(backend, {"rough_understand": "A bobcat and a concatenated scatter."}),
    ]
    kwargs = batch(backend, ids, decode=False, tags=[["cat"]] * 3)
    assert UnderstandingReward()(**kwargs) == [0.0, 1.0, 0.0]


def test_understanding_plurals_and_phrases(tiny):
    backend = tiny[2]
    text = "Buses wait at traffic-lights under berries and leaves."
    kwargs = batch(
        backend,
        [completion(backend, {"rough_understand": text})],
        decode=False,
        tags=[["bus", "traffic light", "berry", "leaf", "light bulb"]],
    )
    assert UnderstandingReward()(**kwargs) == [pytest.approx(4 / 5)]


def test_understanding_block_choice_no_tags_and_missing_text(tiny):
    backend = tiny[2]
    complete = completion(backend)
    missing = without_closing_tag(backend, complete, "rough_understand")
    kwargs = batch(backend, [complete, complete, missing], decode=False, tags=[["boulder"], [], ["lion"]])
    assert UnderstandingReward()(**kwargs) == [0.0, None, 0.0]
    assert UnderstandingReward(block="middle_understand")(**kwargs) == [1.0, None, 1.0]
    with pytest.raises(ValueError, match="rough_image"):
        UnderstandingReward(block="rough_image")


# ----- generation ------------------------------------------------------------------------------------------------


def test_generation_equals_pyiqa_on_the_decoded_final_image(tiny):
    import pyiqa

    backend = tiny[2]
    kwargs = batch(backend, [completion(backend, seed=1), completion(backend, seed=2)])
    finals = [p.images["final"] for p in kwargs["vlcot"]]
    entropy = pyiqa.create_metric("entropy", device="cpu")
    piqe = pyiqa.create_metric("piqe", device="cpu")
    direct_entropy = [float(entropy(img)) for img in finals]  # pyiqa reads the PIL image itself, one at a time
    direct_piqe = [float(piqe(img)) for img in finals]
    assert direct_entropy[0] != direct_entropy[1]

    reward = GenerationReward(metrics=("entropy",), device="cpu")
    assert reward(**kwargs) == pytest.approx(direct_entropy, abs=1e-6)
    # piqe is lower-is-better: inverted as 1 / (1 + x) by default.
    assert GenerationReward(metrics=("piqe",), device="cpu")(**kwargs) == pytest.approx(
        [1 / (1 + x) for x in direct_piqe], abs=1e-6
    )
    weighted = GenerationReward(
        metrics=("entropy", "piqe"), weights=[3.0, 1.0], normalize={"entropy": 8.0, "piqe": [100, 0]}, device="cpu"
    )
    expected = [(3 * e / 8 + (100 - p) / 100) / 4 for e, p in zip(direct_entropy, direct_piqe)]
    assert weighted(**kwargs) == pytest.approx(expected, abs=1e-6)


def test_generation_logs_raw_scores_and_skips_missing_images(tiny):
    backend = tiny[2]
    good = completion(backend, seed=3)
    broken = without_closing_tag(backend, good, "final_image")
    logs = Logs()
    kwargs = batch(backend, [good, broken], log_metric=logs)
    scores = GenerationReward(metrics=("entropy",), device="cpu")(**kwargs)
    assert scores[1] is None and scores[0] > 0
    assert logs.values["generation/entropy"] == [pytest.approx(scores[0])]


def test_generation_rejects_bad_settings():
    with pytest.raises(ValueError, match="2 weights for 1 metrics"):
        GenerationReward(metrics=("entropy",), weights=[1, 2])
    with pytest.raises(ValueError, match="normalize"):
        GenerationReward(metrics=("entropy",), normalize={"musiq": 100})
    with pytest.raises(ValueError, match="image='best'"):
        GenerationReward(image="best")


# ----- fidelity --------------------------------------------------------------------------------------------------


def lr_of(image, scale=4):
    """The LR image the fidelity reward's documented op gives: PIL bicubic to 1/scale."""
    return image.resize((image.width // scale, image.height // scale), Image.Resampling.BICUBIC)


def noisy(image, sigma, seed=0):
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def test_fidelity_is_maximal_when_the_final_image_downscales_to_the_lr(tiny):
    backend = tiny[2]
    kwargs = batch(backend, [completion(backend, seed=4)])
    final = kwargs["vlcot"][0].images["final"]
    kwargs["lr_image"] = [lr_of(final)]
    assert FidelityReward()(**kwargs) == [1.0]
    assert FidelityReward(metric="ssim")(**kwargs) == [pytest.approx(1.0)]


@pytest.mark.parametrize("metric", ["psnr", "ssim"])
def test_fidelity_decreases_strictly_with_noise(photo, metric):
    final = photo.resize((64, 64), Image.Resampling.BICUBIC)
    images = [final] + [noisy(final, sigma) for sigma in (4, 16, 40, 100)]
    n = len(images)
    scores = FidelityReward(metric=metric)(
        prompts=[""] * n,
        completions=[""] * n,
        completion_ids=[[]] * n,
        stage_images=[{"final": im} for im in images],
        lr_image=[lr_of(final)] * n,
    )
    assert scores[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def psnr_db(a, b):
    """PSNR in dB of two uint8 images, written out independently of the reward's code."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return 10 * np.log10(255.0**2 / np.mean(diff**2))


def test_fidelity_hr_term_and_missing_inputs(photo):
    final = photo.resize((64, 64), Image.Resampling.BICUBIC)
    blurry_hr = final.resize((16, 16), Image.Resampling.BICUBIC).resize((128, 128), Image.Resampling.BICUBIC)
    kwargs = dict(prompts=[""] * 4, completions=[""] * 4, completion_ids=[[]] * 4)
    images = [{"final": final}] * 3 + [{"final": None}]
    scores = FidelityReward(psnr_max=40.0)(
        **kwargs,
        stage_images=images,
        lr_image=[lr_of(final), lr_of(final), None, lr_of(final)],
        hr_image=[final, blurry_hr, None, final],
    )
    assert scores[0] == 1.0  # exact LR and exact HR
    # Exact LR (1.0) averaged with the HR term: HR is resized to the final image's 64x64 first.
    hr_at_64 = blurry_hr.resize((64, 64), Image.Resampling.BICUBIC)
    assert scores[1] == pytest.approx((1.0 + psnr_db(final, hr_at_64) / 40.0) / 2)
    assert scores[2] is None and scores[3] is None  # nothing to compare with / no final image
    lr_only = FidelityReward(hr_weight=0.0)(
        **kwargs, stage_images=images, lr_image=[lr_of(final)] * 4, hr_image=[blurry_hr] * 4
    )
    assert lr_only[:3] == [1.0, 1.0, 1.0]


def test_fidelity_lr_size_compares_at_the_true_lr_size(photo):
    final = photo.resize((64, 64), Image.Resampling.BICUBIC)
    canvas_lr = lr_of(final).resize((64, 64), Image.Resampling.BICUBIC)  # LR already enlarged to the canvas
    kwargs = dict(prompts=[""], completions=[""], completion_ids=[[]], stage_images=[{"final": final}])
    at_16 = FidelityReward(psnr_max=100.0, lr_size=16)(**kwargs, lr_image=[canvas_lr])
    at_canvas = FidelityReward(psnr_max=100.0)(**kwargs, lr_image=[canvas_lr])
    assert at_16 == [pytest.approx(psnr_db(lr_of(final), lr_of(canvas_lr)) / 100.0)]
    assert at_canvas == [pytest.approx(psnr_db(final, canvas_lr) / 100.0)]


# ----- all rewards together, as the trainer calls them -----------------------------------------------------------


def test_every_reward_survives_a_mixed_batch(tiny, photo):
    backend = tiny[2]
    good = completion(backend, seed=5)
    ids_list = [
        good,
        without_closing_tag(backend, good, "final_image"),
        without_image_row(backend, good, "final_image", row=0),
        backend.encode_text("no blocks at all"),
        [],
    ]
    n = len(ids_list)
    lr = photo.resize((8, 8), Image.Resampling.BICUBIC)
    kwargs = batch(
        backend,
        ids_list,
        lr_image=[lr] * n,
        hr_image=[photo] * n,
        tags=[["lion", "rock"]] * n,
        caption=["Lions on a rock."] * n,
        degradation_levels=[PAPER_TRUTH] * n,
        degradation_text=[TEXTS["degradation"]] * n,
        trainer_state=None,
        log_metric=Logs(),
        log_extra=lambda *a, **k: None,
    )
    specs = ["format", "degradation", "understanding", {"name": "generation", "kwargs": {"metrics": ["entropy"]}}]
    rewards, weights = load_rewards([*specs, "fidelity"])
    assert weights == [1.0] * 5
    for reward in rewards:
        reward.prepare("cpu")
        scores = reward(**kwargs)
        assert len(scores) == n, reward.__name__
        assert all(s is None or isinstance(s, float) for s in scores), (reward.__name__, scores)
    by_name = {r.__name__: r(**kwargs) for r in rewards}
    assert by_name["format"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert by_name["degradation"] == [pytest.approx(0.6), pytest.approx(0.6), pytest.approx(0.6), 0.0, 0.0]
    assert by_name["understanding"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [s is None for s in by_name["generation"]] == [False, True, True, True, True]
    assert [s is None for s in by_name["fidelity"]] == [False, True, True, True, True]
