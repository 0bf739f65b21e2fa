import torch

from vlcot_grpo.vlcot import (
    BLOCKS,
    DEFAULT_PROMPT,
    IMAGE_PLACEHOLDER,
    TAGS,
    build_completion_ids,
    parse_completion,
    parse_completions,
)

GRIDS = {"rough": (2, 2), "middle": (4, 4), "final": (8, 8)}
TEXTS = {
    "degradation": "medium blur, downsample, heavy noise, light compression, upsample",
    "rough_understand": "A woman in a space suit.",
    "middle_understand": "An astronaut holding a helmet.",
    "final_understand": "Fine fabric texture.",
}


def _codes(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randint(0, backend.codebook_size, grid, generator=g) for s, grid in GRIDS.items()}


def test_prompt_is_the_papers():
    assert DEFAULT_PROMPT.startswith("Perceive the degradation, understand the image content")
    assert DEFAULT_PROMPT.count(IMAGE_PLACEHOLDER) == 1
    assert all(tag in DEFAULT_PROMPT for tag in TAGS) and len(TAGS) == 14


def test_well_formed_completion(tiny):
    backend = tiny[2]
    codes = _codes(backend)
    ids = build_completion_ids(backend, TEXTS, codes)
    parse = parse_completion(backend, ids, GRIDS)
    assert parse.complete, parse.problems
    assert parse.texts == TEXTS
    for stage, grid in GRIDS.items():
        assert torch.equal(parse.blocks[f"{stage}_image"].codes, codes[stage])
        assert parse.images[stage].size == (grid[1] * 4, grid[0] * 4)
    assert [b.name for b in sorted(parse.blocks.values(), key=lambda b: b.start)] == list(BLOCKS)


def test_truncated_completion(tiny):
    backend = tiny[2]
    ids = build_completion_ids(backend, TEXTS, _codes(backend), eos=False)
    cut = ids[: ids.index(backend.tag_ids["<final_image>"]) + 20]
    parse = parse_completion(backend, cut, GRIDS)
    assert not parse.complete
    assert parse.images["final"] is None and parse.images["middle"] is not None
    assert any("<final_image> is not closed" in p for p in parse.problems)
    assert any("truncated image" in p for p in parse.problems)
    assert parse.text("final_understand") == TEXTS["final_understand"]


def test_blocks_out_of_order(tiny):
    backend = tiny[2]
    tag = backend.tag_ids
    text = backend.encode_text
    ids = [tag["<rough_understand>"], *text("x"), tag["</rough_understand>"]]
    ids += [tag["<degradation>"], *text("light noise"), tag["</degradation>"]]
    parse = parse_completion(backend, ids, GRIDS)
    assert not parse.complete
    assert any("out of order" in p for p in parse.problems)
    assert any("missing blocks" in p and "<final_image>" in p for p in parse.problems)
    assert parse.text("degradation") == "light noise"


def test_empty_block_stray_text_and_wrong_stage_size(tiny):
    backend = tiny[2]
    texts = dict(TEXTS, rough_understand="  ")
    codes = _codes(backend)
    codes["rough"] = torch.zeros(4, 4, dtype=torch.long)  # middle's size in the rough slot
    ids = backend.encode_text("hi") + build_completion_ids(backend, texts, codes)
    parse = parse_completion(backend, ids, GRIDS)
    problems = " | ".join(parse.problems)
    assert "<rough_understand> is empty" in problems
    assert "2 tokens outside any block" in problems
    assert "<rough_image> malformed" in problems and "expected 2x2" in problems
    assert parse.images["rough"] is None and parse.images["final"] is not None


def test_garbage_never_raises(tiny):
    backend = tiny[2]
    g = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, backend.vocab_size, (n,), generator=g) for n in (0, 1, 50, 500)]
    for parse in parse_completions(backend, batch, GRIDS):
        assert not parse.complete and parse.problems


def test_the_parser_never_raises_on_random_and_adversarial_ids(tiny):
    """A property-style fuzz: thousands of sequences mixing tags, codes, text, layout tokens, out-of-range ids
    (negative, 2**32 and beyond) and absurd image headers; every one parses to problems, never an exception."""
    import random

    from vlcot_grpo.vlcot import BLOCKS, close_tag, open_tag

    _, tokenizer, backend = tiny
    rng = random.Random(0)
    tags = [backend.tag_ids[open_tag(b)] for b in BLOCKS] + [backend.tag_ids[close_tag(b)] for b in BLOCKS]
    codes = backend.code_token_ids.tolist()
    layout = backend.layout_token_ids
    text = backend.encode_text("a cat 12*34 on a rock")
    weird = [-1, -(2**40), 2**31, 2**32, 2**32 + 5, 2**63 - 1, backend.vocab_size, len(tokenizer) + 3]
    absurd = backend.encode_text("99999999*99999999") + backend.encode_text("0*5") + backend.encode_text("7*")
    pools = [tags, codes, layout, text, weird, absurd]
    grids = {"rough": (2, 2), "middle": (4, 4), "final": (8, 8)}
    for trial in range(3000):
        ids = []
        for _ in range(rng.randint(0, 60)):
            pool = rng.choice(pools)
            ids.append(rng.choice(pool))
        if trial % 3 == 0:  # an image opened with a real header start, then anything
            template = backend.image_template(rng.randint(1, 3), rng.randint(1, 3)).tolist()
            ids = [backend.tag_ids["<rough_image>"]] + template[: rng.randint(1, 4)] + absurd + ids
        parse = parse_completions(backend, [ids], grids if trial % 2 else None, decode_images=trial % 100 == 0)[0]
        assert isinstance(parse.problems, list)
        if any(not 0 <= i < backend.vocab_size for i in ids):
            assert parse.problems or not parse.blocks
