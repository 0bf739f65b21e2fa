"""The rollout engine: forced layouts, masks, guidance rows, and equality with transformers' generate."""

import pytest
import torch
from transformers import GenerationMixin

from vlcot_grpo.models import CODE
from vlcot_grpo.rollout import RolloutConfig, RolloutEngine
from vlcot_grpo.vlcot import IMAGE_BLOCKS, STAGES, encode_prompt, parse_completions


@pytest.fixture
def tiny(tiny_family):
    """Every test here runs on each family, at its sizes (``tiny.sizes``, ``tiny.grids``, ``tiny.lr``)."""
    return tiny_family


@pytest.fixture
def tag_happy(tiny):
    """The tiny model with +6 on the image-opening tags' logits, so random text opens images often."""
    model, _, backend = tiny
    ids = [backend.tag_ids[f"<{b}>"] for b in IMAGE_BLOCKS]

    def hook(module, inputs, output):
        output = output.clone()
        output[..., ids] += 6.0
        return output

    handle = backend.logits_module.register_forward_hook(hook)
    yield model
    handle.remove()


def _prompt(tiny, photo, extra=(), backend=None):
    return encode_prompt(backend or tiny[2], photo, tiny.lr) + list(extra)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_every_image_block_is_well_formed_whatever_is_sampled(tiny, tag_happy, photo, guidance):
    _, _, backend = tiny
    config = RolloutConfig(
        stage_sizes=tiny.sizes, max_new_tokens=700, text_temperature=1.5, image_top_k=-1, guidance_scale=guidance
    )
    engine = RolloutEngine(tag_happy, backend, config)
    batch = engine.generate([_prompt(tiny, photo)] * 2, 4, torch.Generator().manual_seed(0))
    parses = parse_completions(backend, batch.completion_ids, tiny.grids)
    opened = 0
    for parse in parses:
        for block in IMAGE_BLOCKS:
            if block in parse.blocks:
                opened += 1
                assert parse.blocks[block].error is None, parse.problems
                stage = block.removesuffix("_image")
                assert parse.images[stage].size == tiny.sizes[stage]
        assert not any("malformed" in p for p in parse.problems)
    assert opened >= 8  # the test did exercise image blocks


def test_forced_tokens_have_mask_zero(tiny, photo):
    _, _, backend = tiny
    engine = RolloutEngine(tiny[0], backend, RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=400))
    prompt = _prompt(tiny, photo, [backend.tag_ids["<rough_image>"]])
    batch = engine.generate([prompt], 3, torch.Generator().manual_seed(1))
    template = backend.image_template(*tiny.grids["rough"]).tolist() + [backend.tag_ids["</rough_image>"]]
    for ids, mask in zip(batch.completion_ids, batch.sampled_mask):
        assert len(ids) == len(mask)
        for pos, want in enumerate(template):  # the prompt ended with <rough_image>: the rough image comes first
            assert mask[pos] == (1 if want == CODE else 0), pos
            if want != CODE:
                assert ids[pos] == want
            else:
                assert backend.image_code_mask[ids[pos]]
        # after the image, free text: every token sampled
        rest = mask[len(template) :]
        in_image = False
        for tok, m in zip(ids[len(template) :], rest):
            if tok in [backend.tag_ids[f"<{b}>"] for b in IMAGE_BLOCKS]:
                in_image = True
            if not in_image:
                assert m == 1


def test_text_mode_never_samples_codes_or_layout(tiny, photo):
    _, _, backend = tiny
    engine = RolloutEngine(
        tiny[0], backend, RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=300, text_temperature=3.0)
    )
    batch = engine.generate([_prompt(tiny, photo)], 6, torch.Generator().manual_seed(2))
    for ids in batch.completion_ids:
        if not any(backend.tag_ids[f"<{b}>"] in ids for b in IMAGE_BLOCKS):
            assert all(backend.text_token_mask[t] for t in ids)


def test_rows_finish_at_final_image_with_eos(tiny, photo):
    _, _, backend = tiny
    engine = RolloutEngine(tiny[0], backend, RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=400))
    batch = engine.generate([_prompt(tiny, photo, [backend.tag_ids["<final_image>"]])], 2)
    template_len = len(backend.image_template(*tiny.grids["final"]))
    for ids, mask, finished in zip(batch.completion_ids, batch.sampled_mask, batch.finished):
        assert finished and len(ids) == template_len + 2
        assert ids[-2:] == [backend.tag_ids["</final_image>"], backend.eos_token_id] and mask[-2:] == [0, 0]


@pytest.mark.parametrize("engine_name", ["reference", "static"])
def test_a_chain_ends_with_eos_when_pad_is_eos(tiny, photo, engine_name):
    """Many real tokenizers pad with their EOS: the final image's forced EOS stays (it is no padding)."""
    from copy import deepcopy

    from vlcot_grpo.models import load_backend

    model, tokenizer, _ = tiny
    tokenizer = deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    backend = load_backend(model, tokenizer)
    config = RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=400, engine=engine_name)
    batch = RolloutEngine(model, backend, config).generate(
        [_prompt(tiny, photo, [backend.tag_ids["<final_image>"]], backend)], 2
    )
    for ids, finished in zip(batch.completion_ids, batch.finished):
        assert finished and ids[-2:] == [backend.tag_ids["</final_image>"], backend.eos_token_id]


@pytest.mark.parametrize("engine_name", ["reference", "static"])
def test_a_chain_closed_in_text_gets_a_forced_eos(tiny, photo, engine_name):
    """``</final_image>`` written as text ends the row; the engine adds EOS (forced, mask 0), so the completion reads
    as terminated, not truncated, to TRL's mask_truncated_completions."""
    model, _, backend = tiny
    close = backend.tag_ids["</final_image>"]

    def hook(module, inputs, output):
        output = output.clone()
        output[..., close] += 100.0
        return output

    handle = backend.logits_module.register_forward_hook(hook)
    try:
        config = RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=20, engine=engine_name)
        batch = RolloutEngine(model, backend, config).generate([_prompt(tiny, photo)], 2)
    finally:
        handle.remove()
    for ids, mask, logps, finished in zip(batch.completion_ids, batch.sampled_mask, batch.logprobs, batch.finished):
        assert finished and ids == [close, backend.eos_token_id] and mask == [1, 0] and logps[1] == 0.0


def test_length_limit_truncates(tiny, photo):
    _, _, backend = tiny
    engine = RolloutEngine(tiny[0], backend, RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=10))
    batch = engine.generate([_prompt(tiny, photo, [backend.tag_ids["<final_image>"]])], 2)
    assert all(len(ids) == 10 for ids in batch.completion_ids) and not any(batch.finished)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_greedy_guided_stage_equals_transformers_generate(tiny, photo, guidance):
    model, _, backend = tiny
    grid = tiny.grids["middle"]
    template = backend.image_template(*grid).tolist()
    prompt = _prompt(tiny, photo, backend.encode_text("sharp cat") + [backend.tag_ids["<middle_image>"]])
    config = RolloutConfig(
        stage_sizes=tiny.sizes, max_new_tokens=len(template) + 1, do_sample=False, guidance_scale=guidance
    )
    ours = RolloutEngine(model, backend, config).generate([prompt], 1).completion_ids[0]
    assert ours[: len(template)][0] == template[0]

    codes = torch.nonzero(backend.image_code_mask).squeeze(-1).tolist()
    start = len(prompt) + 1  # transformers gets the (forced) image-start token as part of its prompt

    def allowed(batch_id, input_ids):
        pos = input_ids.shape[-1] - start + 1
        return codes if template[pos] == CODE else [template[pos]]

    kwargs = {}
    if guidance != 1.0:
        kwargs = {"guidance_scale": guidance, "negative_prompt_ids": torch.tensor([[template[0]]])}
    # Janus's own generate turns guidance off in text mode (it passes guidance_scale=None on): the reference is the
    # generate every transformers model inherits
    generate = GenerationMixin.generate.__get__(model) if tiny.family == "janus" else model.generate
    theirs = generate(
        torch.tensor([prompt + [template[0]]]),
        max_new_tokens=len(template) - 1,
        do_sample=False,
        prefix_allowed_tokens_fn=allowed,
        pad_token_id=backend.tokenizer.pad_token_id,
        eos_token_id=None,
        **kwargs,
    )[0, start:].tolist()
    assert ours[1 : len(template)] == theirs
    assert backend.parse_image_tokens(ours[: len(template)], grid).ok


def test_guidance_changes_greedy_codes(tiny, photo):
    model, _, backend = tiny
    prompt = _prompt(tiny, photo, [backend.tag_ids["<final_image>"]])
    out = {}
    for scale in (1.0, 4.0):
        config = RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=400, do_sample=False, guidance_scale=scale)
        out[scale] = RolloutEngine(model, backend, config).generate([prompt], 1).completion_ids[0]
    assert out[1.0] != out[4.0]


def test_prefill_shared_across_generations_matches_separate_prompts(tiny, photo):
    model, _, backend = tiny
    prompt = _prompt(tiny, photo)
    config = RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=60, do_sample=False)
    engine = RolloutEngine(model, backend, config)
    shared = engine.generate([prompt], 3).completion_ids
    separate = engine.generate([prompt, prompt, prompt], 1).completion_ids
    short = engine.generate([prompt[5:], prompt], 1).completion_ids  # left padding must not change row 2
    assert shared == separate and short[1] == separate[0]


def test_stage_token_counts(tiny, tag_happy, photo):
    _, _, backend = tiny
    engine = RolloutEngine(tag_happy, backend, RolloutConfig(stage_sizes=tiny.sizes, max_new_tokens=700))
    batch = engine.generate([_prompt(tiny, photo)], 4, torch.Generator().manual_seed(3))
    parses = parse_completions(backend, batch.completion_ids, tiny.grids, decode_images=False)
    checked = 0
    for row, parse in enumerate(parses):
        for stage in STAGES:
            block = parse.blocks.get(f"{stage}_image")
            if block is not None and block.error is None:
                assert batch.stage_tokens[stage][row] == len(backend.image_template(*tiny.grids[stage]))
                checked += 1
            elif block is None:
                assert batch.stage_tokens[stage][row] == 0
    assert checked >= 4


def test_stage_token_counts_when_the_prompt_opens_the_image(tiny, photo):
    """A prompt that ends with ``<rough_image>`` (the benchmark's, or a chain resumed mid-way): the rough image is
    counted from the completion's first token to its closing tag (it used to count 0)."""
    model, _, backend = tiny
    prompt = _prompt(tiny, photo) + [backend.tag_ids["<rough_image>"]]
    config = RolloutConfig(
        stage_sizes=tiny.sizes, max_new_tokens=len(backend.image_template(*tiny.grids["rough"])) + 5
    )
    batch = RolloutEngine(model, backend, config).generate([prompt], 2, torch.Generator().manual_seed(0))
    close = backend.tag_ids["</rough_image>"]
    for row, ids in enumerate(batch.completion_ids):
        assert ids.index(close) == len(backend.image_template(*tiny.grids["rough"]))
        assert batch.stage_tokens["rough"][row] == ids.index(close)
