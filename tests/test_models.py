import pytest
import torch
from transformers import AutoTokenizer

from vlcot_grpo.models import CODE, load_backend, load_model
from vlcot_grpo.models.emu3 import END_OF_ROW, IMAGE_START
from vlcot_grpo.models.tiny import TINY_FAMILIES, TinyEmu3Spec, build_tiny_emu3, ensure_tiny_emu3


@pytest.fixture
def tiny(tiny_family):
    """Every test of this module that takes ``tiny`` runs on each family (``tiny_emu3``: Emu3 only)."""
    return tiny_family


def _step(tiny) -> int:
    """Codes per side unit of the family's layout (PURE counts sides in 4-code units)."""
    return 4 if tiny.family == "pure" else 1


@pytest.mark.parametrize("shape", [(2, 2), (1, 3), (3, 1)])
def test_encode_decode_keeps_requested_size(tiny, photo, shape):
    _, _, backend = tiny
    unit = tiny.sizes["rough"][0]  # a side every family takes: 8 pixels for Emu3, 32 for PURE
    size = (shape[0] * unit, shape[1] * unit)
    codes = backend.encode_images([photo, photo.convert("L")], size)
    assert codes.shape == (2, size[0] // backend.downsample, size[1] // backend.downsample)
    assert int(codes.min()) >= 0 and int(codes.max()) < backend.codebook_size
    images = backend.decode_codes(codes)
    assert [im.size for im in images] == [(size[1], size[0])] * 2
    assert all(im.mode == "RGB" for im in images)


def test_size_not_multiple_of_downsample_is_a_clear_error(tiny_emu3, photo):
    with pytest.raises(ValueError, match="30x32.*downsample factor 4"):
        tiny_emu3[2].encode_images([photo], (30, 32))


@pytest.mark.parametrize("grid", [(1, 1), (4, 4), (3, 7), (8, 2), (16, 16)])
def test_layout_round_trip(tiny, grid):
    backend = tiny[2]
    grid = (grid[0] * _step(tiny), grid[1] * _step(tiny))
    codes = torch.randint(0, backend.codebook_size, grid)
    ids = backend.codes_to_token_ids(codes)
    template = backend.image_template(*grid)
    assert len(ids) == len(template)
    assert int((template == CODE).sum()) == grid[0] * grid[1]
    # a layout without size tokens (Janus) is read against the grid expected of it
    parsed = backend.parse_image_tokens(ids, None if backend.announces_grid else grid)
    assert parsed.ok, parsed.error
    assert torch.equal(parsed.codes, codes)
    assert backend.parse_image_tokens(ids, expected_grid=grid).ok


def test_layout_is_emu3s(tiny_emu3):
    _, tokenizer, backend = tiny_emu3
    ids = backend.codes_to_token_ids(torch.zeros(2, 3, dtype=torch.long)).tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:5] == [IMAGE_START, "2", "*", "3", "<|image token|>"]
    assert tokens[-2:] == ["<|extra_201|>", "<|image end|>"]
    assert tokens.count(END_OF_ROW) == 2


def _grid(tiny) -> tuple[int, int]:
    return 3 * _step(tiny), 4 * _step(tiny)


def _ids(tiny):
    torch.manual_seed(0)
    return tiny[2].codes_to_token_ids(torch.randint(0, tiny[2].codebook_size, _grid(tiny))).tolist()


def _expected(tiny):
    """The grid to parse ``_ids`` against: none where the layout announces it (read from the size tokens)."""
    return None if tiny[2].announces_grid else _grid(tiny)


def test_malformed_missing_row_end(tiny):
    backend = tiny[2]
    if not backend.row_end():
        pytest.skip(f"{tiny.family} has no end-of-row token")
    ids = _ids(tiny)
    rows, cols = _grid(tiny)
    prefix = len(backend.image_prefix(rows, cols))
    del ids[prefix + cols]  # first row's end-of-row token
    result = backend.parse_image_tokens(ids)
    assert not result.ok and result.codes is None
    row_end_token = tiny[1].convert_ids_to_tokens(backend.row_end()[0])
    assert f"row 0, column {cols}" in result.error and row_end_token in result.error


def test_malformed_truncated(tiny):
    result = tiny[2].parse_image_tokens(_ids(tiny)[:-5], _expected(tiny))
    assert not result.ok and "truncated image" in result.error


def test_malformed_text_inside_image(tiny):
    backend = tiny[2]
    ids = _ids(tiny)
    ids[len(backend.image_prefix(*_grid(tiny))) + 2] = backend.encode_text("a")[0]
    result = backend.parse_image_tokens(ids, _expected(tiny))
    assert not result.ok and "expected an image code" in result.error and "'a'" in result.error


def test_malformed_wrong_size_tokens(tiny):
    backend = tiny[2]
    if not backend.announces_grid:
        pytest.skip(f"{tiny.family} has no size tokens")
    rows, cols = _grid(tiny)
    square = 4 * _step(tiny)
    result = backend.parse_image_tokens(_ids(tiny), expected_grid=(square, square))
    assert not result.ok and f"{rows}x{cols}" in result.error and f"expected {square}x{square}" in result.error
    garbled = _ids(tiny)
    garbled[1] = backend.encode_text("x")[0]
    result = backend.parse_image_tokens(garbled)
    assert not result.ok and "size token" in result.error


def test_malformed_inputs_never_raise(tiny):
    backend = tiny[2]
    for ids in ([], [10**6], [backend.tag_ids["<rough_image>"]] * 5, _ids(tiny) + [1, 2]):
        assert not backend.parse_image_tokens(ids).ok


def test_masks_partition_the_vocabulary(tiny):
    backend = tiny[2]
    assert int(backend.image_code_mask.sum()) == backend.codebook_size
    assert not (backend.image_code_mask & backend.text_token_mask).any()
    for tok in backend.layout_token_ids:
        assert not backend.text_token_mask[tok]
    digits = backend.encode_text("0123456789*")
    assert backend.text_token_mask[digits].all()  # size tokens are ordinary text
    assert all(backend.text_token_mask[t] for t in backend.tag_ids.values())
    assert len(backend.tag_ids) == 14 and len(set(backend.tag_ids.values())) == 14


def test_saved_and_reloaded_gives_identical_logits(tiny, request):
    model, tokenizer, _ = tiny
    path = request.getfixturevalue("tiny_path" if tiny.family == "emu3" else f"tiny_{tiny.family}_path")
    again = load_model(str(path)).eval()
    ids = torch.randint(0, len(tokenizer), (2, 300))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    spec_class, build = TINY_FAMILIES[tiny.family]
    fresh, _ = build(spec_class())  # same seed -> same weights
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()


def test_different_seed_gives_different_model():
    a, _ = build_tiny_emu3(TinyEmu3Spec(seed=0))
    b, _ = build_tiny_emu3(TinyEmu3Spec(seed=1))
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_ensure_reuses_and_rebuilds(tmp_path):
    path = ensure_tiny_emu3(tmp_path / "m")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_emu3(tmp_path / "m").joinpath("model.safetensors").stat().st_mtime_ns == stamp
    ensure_tiny_emu3(tmp_path / "m", TinyEmu3Spec(seed=3))
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp


def test_forward_of_a_few_thousand_tokens_stays_small(tiny_emu3):
    """The tests' model is small enough for paper-length sequences on a CPU (its speed is not a test's business:
    benchmarks/rollout.py --preset tiny measures it)."""
    model, tokenizer, _ = tiny_emu3
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.config.text_config._attn_implementation == "sdpa"  # no (T, T) attention matrix per head
    ids = torch.randint(0, len(tokenizer), (1, 3000))
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=1).logits
    assert logits.shape == (1, 1, model.config.text_config.vocab_size) and torch.isfinite(logits).all()


def test_tokenizer_is_character_level_with_single_token_tags(tiny):
    tokenizer = tiny[1]
    ids = tokenizer("ab <final_image>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4
    assert tokenizer.decode(ids) == "ab <final_image>"


def test_unknown_model_type_lists_backends(tiny):
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "llama"})()

    with pytest.raises(ValueError, match="llama.*emu3"):
        load_backend(Fake(), tiny[1])


def test_import_is_offline_and_light():
    import subprocess
    import sys

    code = "import sys, vlcot_grpo; assert 'trl' not in sys.modules and 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_janus_images_are_read_against_the_stage_grid(tiny_janus):
    """Janus writes no size or end-of-row token: the same codes read as any grid of their count, so an image is
    parsed against its stage's grid; without one, only a square grid can be read, and anything else is an error
    that says why."""
    backend = tiny_janus[2]
    codes = torch.arange(24).view(4, 6) % backend.codebook_size
    ids = backend.codes_to_token_ids(codes)
    assert backend.parse_image_tokens(ids, (4, 6)).codes.tolist() == codes.tolist()
    assert backend.parse_image_tokens(ids, (6, 4)).codes.tolist() == codes.view(6, 4).tolist()
    unread = backend.parse_image_tokens(ids)
    assert not unread.ok and "no size tokens" in unread.error and "26 tokens" in unread.error
    square = backend.codes_to_token_ids(codes.view(-1)[:16].view(4, 4))
    assert backend.parse_image_tokens(square).grid == (4, 4)
    short = backend.parse_image_tokens(ids[:-2], (4, 6))
    assert not short.ok and "truncated image: 24 of 26 tokens" in short.error
    stub = backend.parse_image_tokens(ids[:10], (4, 6))
    assert not stub.ok and "the stage expects a 4x6 grid, but the image has only 10 tokens" in stub.error
