"""The static rollout engine (vlcot_grpo.fast_rollout) against the reference engine: same tokens under greedy
decoding, same sampled distribution, guidance-cache restarts, well-formed images. CPU tests run the decode step
eagerly; the tests marked ``gpu`` check CUDA-graph replay and the larger presets on a device machine."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from vlcot_grpo import fast_rollout
from vlcot_grpo.fast_rollout import StaticDecoder
from vlcot_grpo.models import load_backend
from vlcot_grpo.rollout import RolloutConfig, RolloutEngine
from vlcot_grpo.vlcot import IMAGE_BLOCKS, encode_prompt, parse_completions

SIZES = {"rough": (8, 8), "middle": (16, 16), "final": (32, 32)}
GRIDS = {s: (h // 4, w // 4) for s, (h, w) in SIZES.items()}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two cores shared with other jobs: one intra-op thread makes these tiny forwards ~30x faster, not slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def hooks(tiny):
    """Adds logit hooks to a model (the tiny Emu3 unless ``model`` is given) for one test; removed afterwards."""
    handles = []

    def add(fn, pre_embed=None, model=None):
        model = tiny[0] if model is None else model
        handles.append(load_backend(model, tiny[1]).logits_module.register_forward_hook(fn))
        if pre_embed is not None:
            handles.append(model.get_input_embeddings().register_forward_pre_hook(pre_embed, with_kwargs=True))

    yield add
    for h in handles:
        h.remove()


def _on_device(tensor):
    """``tensor`` moved to a device once, then reused: a hook may not copy host memory while a CUDA graph is being
    captured (the eager warm-up before each capture fills this cache)."""
    copies = {}

    def get(device):
        if device not in copies:
            copies[device] = tensor.to(device)
        return copies[device]

    return get


def _tag_bias(backend, bonus=6.0):
    """+bonus on the image-opening tags' logits, so random text opens images often."""
    bias = torch.zeros(backend.vocab_size)
    bias[[backend.tag_ids[f"<{b}>"] for b in IMAGE_BLOCKS]] = bonus
    bias = _on_device(bias)

    def hook(module, inputs, output):
        return output + bias(output.device).to(output.dtype)

    return hook


def _chain_hooks(backend, code_bias=None):
    """Right after ``</rough_image>`` / ``</middle_image>`` the next stage's opening tag wins, so a row writes
    rough, middle, final with no text between. ``code_bias``: a fixed logit bias (e.g. one code hugely favoured)."""
    last = {}
    table = torch.full((backend.vocab_size,), -1, dtype=torch.long)
    table[backend.tag_ids["</rough_image>"]] = backend.tag_ids["<middle_image>"]
    table[backend.tag_ids["</middle_image>"]] = backend.tag_ids["<final_image>"]
    table = _on_device(table)
    code_bias = None if code_bias is None else _on_device(code_bias)

    def pre(module, args, kwargs):
        ids = args[0] if args else kwargs["input"]
        last["ids"] = ids[:, -1]

    def hook(module, inputs, output):
        nxt = table(output.device)[last["ids"]]
        bonus = torch.zeros_like(output[:, -1])
        bonus.scatter_(-1, nxt.clamp(min=0)[:, None], (nxt >= 0).to(bonus.dtype)[:, None] * 100.0)
        output = output.clone()
        output[:, -1] += bonus
        if code_bias is not None:
            output = output + code_bias(output.device).to(output.dtype)
        return output

    return pre, hook


#: decode attention variants by test id: the kernels, each with each row's own prompt cache, and "shared" = "sdpa"
#: with share_prompt_cache (the default where there are several generations)
KERNELS = ["sdpa", "split", "shared"]


def _attention(kernel: str) -> dict:
    if kernel == "shared":
        return {"decode_attention": "sdpa", "share_prompt_cache": True}
    return {"decode_attention": kernel, "share_prompt_cache": False}


def _config(**kw):
    base = {"stage_sizes": SIZES, "kv_bucket": 16, "sync_every": 5}  # Emu3's sizes unless stage_sizes is given
    base.update(kw)
    return RolloutConfig(**base)


def _both(model, backend, prompts, g, seeds=None, **kw):
    out = {}
    for i, engine in enumerate(("reference", "static")):
        gen = None if seeds is None else torch.Generator().manual_seed(seeds[i])
        out[engine] = RolloutEngine(model, backend, _config(engine=engine, **kw)).generate(prompts, g, gen)
    return out["reference"], out["static"]


def _prompts(backend, photo, lr=(16, 16)):
    base = encode_prompt(backend, photo, lr)
    tags = backend.tag_ids
    return [
        base,
        base[9:] + backend.encode_text("a sharp cat") + [tags["<rough_image>"]],  # shorter, starts in image mode
        base[3:] + [tags["<final_image>"]],
    ]


@pytest.fixture
def small_pieces(monkeypatch):
    """The "split" kernel cuts even the tiny model's short reads into many pieces (16 positions each: the
    memory-efficient kernel wants its mask rows 16-aligned)."""
    from vlcot_grpo import attention

    monkeypatch.setattr(attention, "SPLIT_MIN_PIECE", 16)
    monkeypatch.setattr(attention, "SPLIT_BLOCKS_PER_UNIT", 10_000)
    pieces, attend = [], attention.split_kv_attention

    def counted(q, keys, values, bias, scaling):
        pieces.append(bias.shape[1])
        return attend(q, keys, values, bias, scaling)

    monkeypatch.setattr(attention, "split_kv_attention", counted)
    return pieces


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("max_new", [700, "in-middle"])
def test_greedy_equals_reference(tiny_family, hooks, photo, guidance, max_new, kernel, small_pieces):
    model, _, backend = tiny = tiny_family
    hooks(_tag_bias(backend), model=model)
    pre, hook = _chain_hooks(backend)
    hooks(hook, pre_embed=pre, model=model)
    prompts = _prompts(backend, photo, tiny.lr)
    if max_new == "in-middle":  # Emu3: 37; a limit that ends inside the middle image for the first two prompts
        # (Janus's images, with no row ends, are shorter: 18 tokens in the middle)
        max_new = len(backend.image_template(*tiny.grids["rough"])) + (24 if backend.row_end() else 8)
    kw = {"max_new_tokens": max_new, "do_sample": False, "guidance_scale": guidance, **_attention(kernel)}
    ref, fast = _both(model, backend, prompts, 2, stage_sizes=tiny.sizes, **kw)
    assert (max(small_pieces) >= 4) if kernel == "split" else not small_pieces
    assert fast.completion_ids == ref.completion_ids
    assert fast.sampled_mask == ref.sampled_mask
    assert fast.finished == ref.finished
    assert fast.stage_tokens == ref.stage_tokens and fast.prompt_ids == ref.prompt_ids
    parses = parse_completions(backend, fast.completion_ids, tiny.grids, decode_images=False)
    if max_new != 700:  # the length limit cuts every row inside an image (middle for the first two prompts)
        assert not any(fast.finished) and all(len(c) == max_new for c in fast.completion_ids)
        assert all("truncated" in p.blocks["middle_image"].error for p in parses[:4])
    else:  # whole chains (the first opened from text mode), rows of different lengths
        assert all(fast.finished) and all(
            p.blocks[b].error is None for p in parses for b in p.blocks if b.endswith("_image")
        )
        assert sum(len(p.blocks) for p in parses) >= (10 if backend.row_end() else 8)  # Janus: no text between
        assert len({len(c) for c in fast.completion_ids}) == 3


def test_text_eos_ends_a_row(tiny, hooks, photo):
    model, _, backend = tiny
    bias = torch.zeros(backend.vocab_size)
    bias[backend.eos_token_id] = 30.0
    hooks(lambda module, inputs, output: output + bias)
    prompts = _prompts(backend, photo)[:2]  # one in text mode, one inside an image (EOS only after it)
    ref, fast = _both(model, backend, prompts, 2, max_new_tokens=60, do_sample=False, guidance_scale=2.0)
    assert fast.completion_ids == ref.completion_ids and fast.finished == ref.finished == [True] * 4
    assert fast.completion_ids[0] == [backend.eos_token_id] and fast.sampled_mask[0] == [1]
    assert fast.completion_ids[2][-1] == backend.eos_token_id and len(fast.completion_ids[2]) > 10


def test_short_prompt_and_limit_with_a_long_image(tiny, photo):
    """Prompt + limit shorter than the longest image (the guidance cache is sized by the image)."""
    model, _, backend = tiny
    prompt = backend.bos_token_ids + [backend.tag_ids["<final_image>"]]
    for limit in (40, 90):
        ref, fast = _both(model, backend, [prompt], 2, max_new_tokens=limit, do_sample=False, guidance_scale=3.0)
        assert fast.completion_ids == ref.completion_ids and fast.finished == ref.finished == [limit == 90] * 2


def test_greedy_guidance_changes_codes_in_both_engines(tiny, photo):
    model, _, backend = tiny
    prompt = encode_prompt(backend, photo, (16, 16)) + [backend.tag_ids["<final_image>"]]
    plain = _both(model, backend, [prompt], 1, max_new_tokens=90, do_sample=False)
    guided = _both(model, backend, [prompt], 1, max_new_tokens=90, do_sample=False, guidance_scale=4.0)
    assert plain[1].completion_ids == plain[0].completion_ids and guided[1].completion_ids == guided[0].completion_ids
    assert plain[1].completion_ids != guided[1].completion_ids


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_kernels_equal_plain_attention(kv_heads):
    """Both decode kernels (grouped heads folded into the query, masked positions, pieces merged by log-sum-exp)
    against attention written out with repeated key/value heads."""
    from vlcot_grpo.attention import attend, split_bias

    gen = torch.Generator().manual_seed(0)
    b, heads, length, dim = 3, 4, 64, 8
    q = torch.randn(b, heads, 1, dim, generator=gen)
    k = torch.randn(b, kv_heads, length, dim, generator=gen)
    v = torch.randn(b, kv_heads, length, dim, generator=gen)
    mask = torch.rand(b, length, generator=gen) > 0.4
    mask[:, 0] = True
    rep = heads // kv_heads
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ kr.transpose(-1, -2)) * 0.3
    want = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), -1) @ vr
    bias = torch.zeros(b, 1, 1, length).masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(attend(q, k, v, bias, 0.3, "sdpa"), want)
    # "split": pieces of 16; row 0 sees only its first piece, row 1 only its last (the others are wholly masked)
    mask[0, 16:] = False
    mask[1, :48] = False
    mask[1, 60] = True
    want = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), -1) @ vr
    for splits in (1, 2, 4):
        got = attend(q, k, v, split_bias(mask, kv_heads, splits, q.dtype), 0.3, "split")
        torch.testing.assert_close(got, want, msg=f"split {splits}")


def _check_shared_attention(
    device, dtype, prompts, g, heads, kv_heads, width, n, own, pieces=1, dim=8, tol=None, merge=None
):
    """share_prompt_cache's attention (a prompt's rows read its keys together, in ``pieces`` pieces, then merged with
    each row's own keys by log-sum-exp) against each row attending to its prompt's visible keys followed by its own
    ``own``, written out. The second prompt has left padding over whole pieces and every prompt 3 hidden rounding
    columns."""
    from vlcot_grpo.attention import attend_shared, merge_shared_attention, split_bias

    gen = torch.Generator(device).manual_seed(0)
    rows, rep = prompts * g, heads // kv_heads

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    q = randn(rows, heads, 1, dim)
    pk, pv = randn(prompts, kv_heads, width, dim), randn(prompts, kv_heads, width, dim)
    k, v = randn(rows, kv_heads, n, dim), randn(rows, kv_heads, n, dim)
    visible = torch.ones(prompts, width, dtype=torch.bool, device=device)
    visible[-1, : width // 2 + 1] = False
    visible[:, -3:] = False
    prompt_bias = split_bias(visible, kv_heads, pieces, dtype)
    bias = torch.zeros(rows, 1, 1, n, dtype=dtype, device=device)  # as the engine makes it: one row per row
    bias.masked_fill_(torch.arange(n, device=device) >= own, float("-inf"))
    got = attend_shared(q, pk, pv, prompt_bias, k, v, bias, g, 0.3, merge or merge_shared_attention)
    for r in range(rows):
        p = r // g
        keys = torch.cat([pk[p][:, visible[p]], k[r, :, :own]], 1).repeat_interleave(rep, 0)
        values = torch.cat([pv[p][:, visible[p]], v[r, :, :own]], 1).repeat_interleave(rep, 0)
        want = F.scaled_dot_product_attention(q[r], keys, values, scale=0.3)
        torch.testing.assert_close(got[r], want, atol=tol, rtol=tol, msg=f"row {r}")


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("pieces", [1, 2, 4])
def test_shared_prompt_attention_equals_whole_rows(kv_heads, pieces):
    """With 4 pieces of 8, the padded prompt's first two pieces are wholly masked: their weight must be 0."""
    kw = {"prompts": 2, "g": 3, "heads": 4, "kv_heads": kv_heads, "width": 32, "n": 16, "own": 5}
    _check_shared_attention("cpu", torch.float32, **kw, pieces=pieces)


def test_shared_prompt_attention_bf16_three_prompts():
    """bf16 (the GPU dtype) with three prompts, grouped heads (rep 3) and 6 pieces, one wholly masked at the start
    of the padded prompt and one with its visible part starting inside it."""
    kw = {"prompts": 3, "g": 2, "heads": 6, "kv_heads": 2, "width": 48, "n": 32, "own": 9}
    _check_shared_attention("cpu", torch.bfloat16, **kw, pieces=6, tol=2e-2)


def test_prompt_pieces():
    from vlcot_grpo.attention import prompt_pieces

    assert prompt_pieces(32, 4191, 132) == (33, 128)  # 7B paper shape on an H100: 1056 blocks
    assert prompt_pieces(8, 4191, 132) == (33, 128)  # 1B: pieces no shorter than 128
    assert prompt_pieces(32, 4191, 1) == (1, 4192)  # one CPU thread: one piece, rounded up to 16
    assert prompt_pieces(32, 100, 132) == (1, 112)
    assert prompt_pieces(1, 16385, 16) == (114, 144)  # no piece of padding only
    for pairs, width, units in ((5, 1000, 16), (64, 3000, 132), (64, 2996, 132), (1, 17, 1), (7, 5, 1000)):
        pieces, piece = prompt_pieces(pairs, width, units)
        assert piece % 16 == 0 and (pieces - 1) * piece < width <= pieces * piece < width + 16 * pieces


def test_shared_prompt_cache_holds_each_prompt_once(tiny, photo):
    """share_prompt_cache: per layer the prompts' keys once (in whole pieces, less than 16 positions each past the
    prompt) and each row's generated tokens only, instead of every row holding its prompt; with one generation per prompt there is nothing to share."""
    model, _, backend = tiny
    prompts = _prompts(backend, photo)
    width = max(len(p) for p in prompts)
    sizes = {}
    for shared in (False, True):
        engine = RolloutEngine(
            model, backend, _config(max_new_tokens=40, guidance_scale=3.0, share_prompt_cache=shared)
        )
        decoder = StaticDecoder(engine, torch.device("cpu"))
        decoder.prepare(prompts, 4)
        caches = decoder.caches
        assert decoder.shared == shared and (caches.row.mask is None) == shared and (caches.prompt is None) != shared
        if shared:
            assert decoder.pieces[0] > 1  # one thread: pieces of ~250 positions
            prompt_keys = caches.prompt.keys[0]
            assert prompt_keys.shape[0] == 3 and prompt_keys.shape[2] == decoder.pieces[0] * decoder.pieces[1]
            assert width <= prompt_keys.shape[2] < width + 16 * decoder.pieces[0]
            assert caches.row.length == 48  # 40 new tokens in buckets of 16
        else:
            assert caches.row.length == -(-(width + 40) // 16) * 16
        held = [caches.row] + ([caches.prompt] if shared else [])  # the guidance cache is the same either way
        sizes[shared] = sum(t.numel() for c in held for t in c.keys + c.values)
    assert sizes[True] < 0.5 * sizes[False]
    decoder = StaticDecoder(RolloutEngine(model, backend, _config(share_prompt_cache=True)), torch.device("cpu"))
    decoder.prepare(prompts, 1)
    assert not decoder.shared and decoder.caches.prompt is None
    with pytest.raises(ValueError, match="share_prompt_cache works with decode_attention='sdpa' only, got 'split'"):
        _config(share_prompt_cache=True, decode_attention="split")
    with pytest.raises(ValueError, match="share_prompt_cache needs kv_bucket to be a multiple of 16, got 24"):
        _config(share_prompt_cache=True, kv_bucket=24)


def test_split_sizes():
    """Pieces: powers of two, aligned, none shorter than SPLIT_MIN_PIECE, enough blocks per SM."""
    from vlcot_grpo.attention import SPLIT_ALIGN, SPLIT_BLOCKS_PER_UNIT, SPLIT_MIN_PIECE, num_splits

    assert num_splits(5 * 32, 4608, 132) == 8  # 7B paper shape on an H100: 1280 blocks
    assert num_splits(5 * 8, 4608, 132) == 32  # 1B (8 key/value heads): 1280 blocks, pieces of 144
    assert num_splits(10_000, 4096, 132) == 1  # already enough blocks
    assert num_splits(8, 512, 1000) == 4  # short reads stop at the shortest piece (128)
    assert num_splits(8, 384, 1000) == 2  # 3 x 128: two pieces of 192, not three
    assert num_splits(8, 528, 1000) == 1  # 33 x 16: halves of 264 are not 16-aligned (an H100 refused 22)
    for pairs, length in ((160, 4608), (40, 9728), (3, 512), (3, 176 * 16)):
        n = num_splits(pairs, length, 132)
        assert length % (n * SPLIT_ALIGN) == 0 and (n == 1 or length // n >= SPLIT_MIN_PIECE)
        assert n == 1 or pairs * n // 2 < SPLIT_BLOCKS_PER_UNIT * 132


def _chi2_same(a: list[int], b: list[int]) -> float:
    """p-value of a two-sample chi-square test that ``a`` and ``b`` come from one categorical distribution."""
    from scipy.stats import chi2

    cats = sorted(set(a) | set(b))
    ca = torch.tensor([a.count(c) for c in cats], dtype=torch.float64)
    cb = torch.tensor([b.count(c) for c in cats], dtype=torch.float64)
    na, nb = ca.sum(), cb.sum()
    stat = float((((ca * (nb / na) ** 0.5 - cb * (na / nb) ** 0.5) ** 2) / (ca + cb)).sum())
    return float(chi2.sf(stat, len(cats) - 1))


@pytest.mark.parametrize(
    "kw",
    [
        {"image_top_k": 12, "image_temperature": 0.7, "guidance_scale": 3.0},
        {"image_top_k": -1, "image_temperature": 1.0, "guidance_scale": 1.0},
        {"text_top_p": 0.8, "text_temperature": 0.8, "text_top_k": 30},
        {"image_top_k": 12, "image_temperature": 0.7, "guidance_scale": 3.0, "share_prompt_cache": True},
    ],
    ids=["fixed-top-k-guided", "entropy-top-k", "text-top-p", "guided-shared-prompt"],
)
def test_sampled_distribution_matches_reference(tiny, hooks, photo, kw):
    model, _, backend = tiny
    # Sharpen the random model's flat logits, so that temperature, top-k/p and guidance visibly shape the sample.
    hooks(lambda module, inputs, output: output * 25.0)
    text = "image_top_k" not in kw
    tail = backend.encode_text("cat") if text else [backend.tag_ids["<rough_image>"]]
    prompt = encode_prompt(backend, photo, (16, 16)) + tail
    # rough 2x2 image: 5 forced header tokens, then codes at 5, 6 and (after a row end) 8, 9
    positions = [0, 1, 2] if text else [5, 6, 8]
    # different seeds: independent samples, so this tests the distribution and not a shared random stream
    ref, fast = _both(model, backend, [prompt], 800, seeds=(0, 1), max_new_tokens=positions[-1] + 1, **kw)
    for pos in positions:
        a = [c[pos] for c in ref.completion_ids]
        b = [c[pos] for c in fast.completion_ids]
        assert len(set(a)) > 2, "degenerate: the test would not see a distribution"
        assert _chi2_same(a, b) > 1e-3, pos


def _multinomial_is_exponential_race() -> bool:
    probs = torch.softmax(torch.randn(4, 50), -1)
    a = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    noise = torch.empty_like(probs).exponential_(generator=torch.Generator().manual_seed(3))
    return torch.equal(a, (probs / noise).argmax(-1))


@pytest.mark.skipif(not _multinomial_is_exponential_race(), reason="torch.multinomial draws differently here")
@pytest.mark.parametrize("guidance,shared", [(1.0, False), (3.0, False), (3.0, True)])
def test_seeded_samples_equal_reference(tiny_family, hooks, photo, guidance, shared):
    """torch.multinomial is the exponential race the static engine runs, drawn in the same order: one seed gives the
    reference path's sampled rollouts token for token (every stage, text and codes, entropy top-k and top-p), with
    and without share_prompt_cache."""
    model, _, backend = tiny = tiny_family
    hooks(_tag_bias(backend), model=model)
    kw = {"image_top_k": -1, "text_top_p": 0.9, "text_temperature": 1.3, "guidance_scale": guidance}
    kw["share_prompt_cache"] = shared
    prompts = _prompts(backend, photo, tiny.lr)
    ref, fast = _both(model, backend, prompts, 3, seeds=(5, 5), max_new_tokens=500, stage_sizes=tiny.sizes, **kw)
    # The two attention paths round differently (~1e-7), which can flip a near-tie in one draw of one row on some
    # platform; every row but one must match exactly (all do here), masks and finished flags included.
    same = [a == b for a, b in zip(fast.completion_ids, ref.completion_ids)]
    assert sum(same) >= len(same) - 1
    rows = [i for i, ok in enumerate(same) if ok]
    assert all(fast.sampled_mask[i] == ref.sampled_mask[i] and fast.finished[i] == ref.finished[i] for i in rows)
    # the sampling log-probs and the entropy top-k they record agree too; k = round(1 + 1999 sigmoid(H - 5)) is
    # steep, so the same ~1e-7 in the entropy can put one k a unit off at a rounding boundary (seen with the
    # trained tiny VQ's prompt codes: 1261 vs 1260, the sampled tokens equal)
    assert all(len(fast.top_k[i]) == len(ref.top_k[i]) for i in rows)
    assert all(abs(a - b) <= 1 for i in rows for a, b in zip(fast.top_k[i], ref.top_k[i]))
    assert any(max(fast.top_k[i]) > 0 for i in rows)
    for i in rows:
        torch.testing.assert_close(torch.tensor(fast.logprobs[i]), torch.tensor(ref.logprobs[i]), atol=1e-4, rtol=0)
    parses = parse_completions(backend, fast.completion_ids, tiny.grids, decode_images=False)
    assert sum(len(p.blocks) for p in parses) >= 6 and len({len(c) for c in fast.completion_ids}) > 3


class _Recorder(StaticDecoder):
    """Keeps the unconditional logits after every step (those that guide the next token)."""

    def step(self, read_len, guide_read_len):
        super().step(read_len, guide_read_len)
        self.uncond.append(self.state["uncond_logits"].clone())
        self.cond.append(self.state["logits"].clone())


def _record(engine, prompt):
    decoder = _Recorder(engine, torch.device("cpu"))
    decoder.uncond, decoder.cond = [], []
    batch = decoder.run([prompt], 1)
    return batch.completion_ids[0], torch.stack(decoder.uncond)[:, 0], torch.stack(decoder.cond)[:, 0]


def test_guidance_rows_see_only_the_current_image(tiny_family, hooks, photo):
    """Unconditional logits inside an image depend only on that image's tokens: not on the prompt, the text before
    it, or earlier images (the guidance cache restarts at each image start)."""
    model, _, backend = tiny = tiny_family
    code_bias = torch.zeros(backend.vocab_size)
    code_bias[backend.code_token_ids[7]] = 50.0  # every code is the same, whatever the context
    pre, hook = _chain_hooks(backend, code_bias)
    hooks(hook, pre_embed=pre, model=model)
    tags = backend.tag_ids
    base = encode_prompt(backend, photo, tiny.lr)
    limit = sum(len(backend.image_template(*g)) for g in tiny.grids.values()) + 20
    config = _config(max_new_tokens=limit, do_sample=False, guidance_scale=3.0, stage_sizes=tiny.sizes)
    engine = RolloutEngine(model, backend, config)
    # run A: rough, middle, final after one prompt; run B: middle, final after another prompt and other text
    ids_a, uncond_a, cond_a = _record(engine, base + backend.encode_text("a cat") + [tags["<rough_image>"]])
    ids_b, uncond_b, cond_b = _record(
        engine, base[20:] + backend.encode_text("a dog, blurry") + [tags["<middle_image>"]]
    )
    starts_b = {"middle": 0, "final": ids_b.index(tags["<final_image>"]) + 1}  # B's prompt opened the middle image
    for stage in ("middle", "final"):
        start_a, start_b = ids_a.index(tags[f"<{stage}_image>"]) + 1, starts_b[stage]
        n = len(backend.image_template(*tiny.grids[stage])) - 1  # logits after each image token but the last
        torch.testing.assert_close(uncond_a[start_a : start_a + n], uncond_b[start_b : start_b + n])
        assert not torch.allclose(cond_a[start_a : start_a + n], cond_b[start_b : start_b + n], atol=1e-3)
    assert (
        ids_a[ids_a.index(tags["<middle_image>"]) + 1 :] == ids_b
    )  # the same image tokens, so the comparison is fair


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_every_image_block_is_well_formed(tiny_family, hooks, photo, guidance):
    model, _, backend = tiny = tiny_family
    hooks(_tag_bias(backend), model=model)
    config = _config(
        max_new_tokens=700,
        text_temperature=1.5,
        image_top_k=-1,
        guidance_scale=guidance,
        engine="static",
        stage_sizes=tiny.sizes,
    )
    batch = RolloutEngine(model, backend, config).generate(
        _prompts(backend, photo, tiny.lr), 3, torch.Generator().manual_seed(0)
    )
    parses = parse_completions(backend, batch.completion_ids, tiny.grids)
    opened = 0
    for parse, mask, ids in zip(parses, batch.sampled_mask, batch.completion_ids):
        assert len(mask) == len(ids)
        for block in IMAGE_BLOCKS:
            if block in parse.blocks:
                opened += 1
                assert parse.blocks[block].error is None, parse.problems
                stage = block.removesuffix("_image")
                assert parse.images[stage].size == tiny.sizes[stage]
        assert not any("malformed" in p for p in parse.problems)
    assert opened >= 8


def test_buckets_follow_length_and_live_image(tiny, hooks, photo):
    model, _, backend = tiny
    pre, hook = _chain_hooks(backend)
    hooks(hook, pre_embed=pre)
    prompt = encode_prompt(backend, photo, (16, 16)) + [backend.tag_ids["<rough_image>"]]
    config = _config(max_new_tokens=150, do_sample=False, guidance_scale=2.0, share_prompt_cache=False)
    decoder = StaticDecoder(RolloutEngine(model, backend, config), torch.device("cpu"))
    batch = decoder.run([prompt], 2)
    width = len(prompt)
    conds = [c for c, _ in decoder.buckets_used]
    guides = [g for _, g in decoder.buckets_used]
    assert conds == [-(-(width + t + 1) // 16) * 16 for t in range(len(conds))]
    # short while writing the rough image, long for the final one; always whole buckets
    assert max(guides) <= -(-int(decoder.engine.layout.template_len.max()) // 16) * 16 and min(guides) < max(guides)
    assert all(g % 16 == 0 for g in guides)
    assert all(batch.finished) and len(conds) < 150


class _WarmEveryStep(StaticDecoder):
    """Before every step, the rolled-back warm-up step that precedes each CUDA-graph capture."""

    _warming = False

    def step(self, read_len, guide_read_len):
        if not self._warming:
            self._warming = True
            self.warm_up((read_len, guide_read_len))
            self._warming = False
        super().step(read_len, guide_read_len)


def test_warm_up_before_capture_leaves_no_trace(tiny, hooks, photo):
    """The warm-up run before each graph capture is rolled back: doing one before every step changes nothing."""
    model, _, backend = tiny
    hooks(_tag_bias(backend))
    prompt = encode_prompt(backend, photo, (16, 16)) + backend.encode_text("hi")
    config = _config(max_new_tokens=300, guidance_scale=3.0, image_top_k=-1)
    engine = RolloutEngine(model, backend, config)
    plain = StaticDecoder(engine, torch.device("cpu")).run([prompt], 3, torch.Generator().manual_seed(4))
    warmed = _WarmEveryStep(engine, torch.device("cpu")).run([prompt], 3, torch.Generator().manual_seed(4))
    assert warmed.completion_ids == plain.completion_ids and warmed.sampled_mask == plain.sampled_mask
    parses = parse_completions(backend, plain.completion_ids, GRIDS, decode_images=False)
    assert sum(len(p.blocks) for p in parses) >= 3  # images (and so guidance-slot writes) were exercised


@pytest.mark.parametrize("shared", [False, True])
def test_step_traces_without_graph_breaks(tiny, photo, shared):
    """The decode step is one graph for torch.compile (no host reads, no Python branching on tensor values), which
    is what CUDA-graph capture needs; the traced step gives the eager tokens. With and without share_prompt_cache."""
    model, _, backend = tiny
    prompt = encode_prompt(backend, photo, (16, 16)) + [backend.tag_ids["<rough_image>"]]
    config = _config(max_new_tokens=12, guidance_scale=3.0, image_top_k=-1, text_top_p=0.9, share_prompt_cache=shared)
    engine = RolloutEngine(model, backend, config)
    results = []
    for compiled in (False, True):
        decoder = StaticDecoder(engine, torch.device("cpu"))
        decoder.prepare([prompt], 2)
        step = decoder.step
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(decoder.step, backend="eager", fullgraph=True)
        gen = torch.Generator().manual_seed(0)
        with _split_attention(model):
            for _ in range(6):
                decoder.state["text_noise"].exponential_(generator=gen)
                decoder.state["code_noise"].exponential_(generator=gen)
                step(decoder.read_bucket(0), 16)
        results.append(decoder.state["tokens"][:, :6].clone())
    torch._dynamo.reset()
    assert torch.equal(results[0], results[1])


def test_fused_projections_write_the_reference_tokens(tiny, hooks, photo, monkeypatch):
    """``fuse_projections``: q/k/v and gate/up as one product each during the decode steps, the reference path's
    greedy tokens with guidance; the model's own modules are back afterwards. LoRA projections are fused only with
    their adapters merged (unmerged, the adapters would be skipped)."""
    from peft import LoraConfig, get_peft_model

    from vlcot_grpo import fusion
    from vlcot_grpo.models.tiny import build_tiny_emu3

    model, _, backend = tiny
    pre, hook = _chain_hooks(backend)
    hooks(hook, pre_embed=pre)
    before = {name: id(m) for name, m in model.named_modules()}
    seen, fused_forward = [], fusion.FusedFirst.forward

    def counting(self, x):
        seen.append(tuple(self.sizes))
        return fused_forward(self, x)

    monkeypatch.setattr(fusion.FusedFirst, "forward", counting)
    kw = {"max_new_tokens": 300, "do_sample": False, "guidance_scale": 3.0}
    ref, fast = _both(model, backend, _prompts(backend, photo), 2, fuse_projections=True, **kw)
    assert fast.completion_ids == ref.completion_ids and fast.finished == ref.finished
    layers = model.config.get_text_config().num_hidden_layers
    steps, rest = divmod(len(seen), 2 * layers)  # qkv and gate/up of every layer at every decode step
    assert len(set(seen)) == 2 and rest == 0 and steps >= max(map(len, fast.completion_ids)) - 1
    assert {name: id(m) for name, m in model.named_modules()} == before
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    lora = get_peft_model(build_tiny_emu3()[0], LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        with fusion.fused_projections(lora) as swapped:
            assert swapped == 0  # unmerged adapters: fusing the base weights would drop them
        lora.merge_adapter()  # as rollout_merge_adapters does: the merged base layers are fused
        with fusion.fused_projections(lora) as swapped:
            assert swapped == len(targets) * layers
            got = lora(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_compiled_layers_write_the_reference_tokens(presets, shared):
    """``compile_step`` (inductor; C++ kernels on the CPU, Triton on CUDA): the greedy tokens of the reference path
    with guidance; the ten decoder layers share one compiled code (per-layer code would hit dynamo's recompile limit
    of 8); a second ``generate`` with other rows and buckets compiles nothing; afterwards the layers are eager.
    ``shared``: with share_prompt_cache (its merge compiled too)."""
    from torch._dynamo.utils import counters

    from vlcot_grpo.fusion import decoder_layers
    from vlcot_grpo.models import load_backend
    from vlcot_grpo.models.tiny import TinyEmu3Spec, build_tiny_emu3

    model, tokenizer = build_tiny_emu3(TinyEmu3Spec(num_hidden_layers=10))
    backend = load_backend(model.eval(), tokenizer)
    presets.add_chain_hooks(model, backend)
    prompts = presets.make_prompts(backend, 2, 32)
    layers = decoder_layers(model)
    assert len(layers) == 10
    torch._dynamo.reset()
    counters.clear()
    try:
        # Under share_prompt_cache the merge's code specialises on its sizes that are 1 or equal at the first call
        # (prompts x heads against rows, say), so other prompt or generation counts may compile it again; a training
        # run keeps both fixed. There the second call changes only the length and buckets.
        second = (prompts, 2, 90) if shared else (prompts[:1], 3, 90)
        for rows, g, max_new in ((prompts, 2, 160), second):
            kw = {"max_new_tokens": max_new, "do_sample": False, "guidance_scale": 3.0}
            ref = RolloutEngine(model, backend, _config(engine="reference", **kw)).generate(rows, g)
            config = _config(engine="static", compile_step=True, share_prompt_cache=shared, **kw)
            decoder = StaticDecoder(RolloutEngine(model, backend, config), torch.device("cpu"))
            fast = decoder.run(rows, g)
            assert decoder.shared == shared
            assert fast.completion_ids == ref.completion_ids and fast.sampled_mask == ref.sampled_mask
            assert len(set(decoder.buckets_used)) > 2  # several cache buckets
            assert all(layer._compiled_call_impl is None for layer in layers)  # eager again for training
            if max_new == 160:
                assert sum(fast.stage_tokens["middle"]) > 0  # the chain went on into the second image
                compiled = counters["stats"]["unique_graphs"]
                assert 1 <= compiled < len(layers) and decoder.compile_seconds > 0
        assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled again
    finally:
        torch._dynamo.reset()


def test_compiled_fused_layers_write_the_reference_tokens(presets):
    """``compile_step`` with ``fuse_projections``: the swapped projection modules keep one compiled code for all ten
    layers (their outputs handed between modules inside the compiled region) and the reference path's tokens."""
    from torch._dynamo.utils import counters

    from vlcot_grpo.models import load_backend
    from vlcot_grpo.models.tiny import TinyEmu3Spec, build_tiny_emu3

    model, tokenizer = build_tiny_emu3(TinyEmu3Spec(num_hidden_layers=10))
    backend = load_backend(model.eval(), tokenizer)
    presets.add_chain_hooks(model, backend)
    prompts = presets.make_prompts(backend, 2, 32)
    torch._dynamo.reset()
    counters.clear()
    try:
        kw = {"max_new_tokens": 120, "do_sample": False, "guidance_scale": 3.0}
        ref = RolloutEngine(model, backend, _config(engine="reference", **kw)).generate(prompts, 2)
        config = _config(engine="static", compile_step=True, fuse_projections=True, **kw)
        fast = RolloutEngine(model, backend, config).generate(prompts, 2)
        assert fast.completion_ids == ref.completion_ids and fast.sampled_mask == ref.sampled_mask
        assert 1 <= counters["stats"]["unique_graphs"] < 10
    finally:
        torch._dynamo.reset()


def test_a_failed_compile_names_the_option_and_restores_the_model(presets):
    """A compile that fails (here: no working C++ compiler for inductor's CPU kernels) is an error naming
    compile_step; the model's layers and attention are as before."""
    from vlcot_grpo.fusion import decoder_layers

    model, backend = presets.build_preset("tiny", torch.device("cpu"), torch.float32)
    prompts = presets.make_prompts(backend, 1, 32)
    config = _config(max_new_tokens=20, engine="static", compile_step=True)
    attention = model.config.get_text_config()._attn_implementation
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}):
            with pytest.raises(RuntimeError, match=r"compile_step .*C\+\+ compiler"):
                RolloutEngine(model, backend, config).generate(prompts, 2)
    finally:
        torch._dynamo.reset()
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert model.config.get_text_config()._attn_implementation == attention


def test_a_failed_compile_left_unset_falls_back_to_uncompiled_steps(presets, monkeypatch, caplog):
    """compile_step unset is a best effort: where it resolves on (CUDA graphs; forced here on the CPU) and compiling
    fails, a warning names the option and why, the same call returns the uncompiled rollout (same tokens, the
    generator untouched by the attempt), and the engine's later calls do not try again."""
    import logging

    from vlcot_grpo.fusion import decoder_layers

    model, backend = presets.build_preset("tiny", torch.device("cpu"), torch.float32)
    presets.add_chain_hooks(model, backend)
    prompts = presets.make_prompts(backend, 1, 32)
    kw = {"max_new_tokens": 30, "engine": "static", "guidance_scale": 3.0}
    want = RolloutEngine(model, backend, _config(compile_step=False, **kw)).generate(
        prompts, 2, torch.Generator().manual_seed(3)
    )
    monkeypatch.setattr(RolloutConfig, "resolved_compile", lambda self, device: self.compile_step is not False)
    engine = RolloutEngine(model, backend, _config(**kw))
    runs = []
    monkeypatch.setattr(
        StaticDecoder,
        "prepare",
        lambda self, *a, _prepare=StaticDecoder.prepare: runs.append(self.compile) or _prepare(self, *a),
    )
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}):
            with caplog.at_level(logging.WARNING, logger="vlcot_grpo.fast_rollout"):
                got = engine.generate(prompts, 2, torch.Generator().manual_seed(3))
            again = engine.generate(prompts, 2, torch.Generator().manual_seed(3))
    finally:
        torch._dynamo.reset()
    assert runs == [True, False, False]  # one compiled attempt, then uncompiled, and uncompiled afterwards
    assert "compile_step (rollout_compile" in engine.compile_failure and "C++ compiler" in engine.compile_failure
    warned = [r.message for r in caplog.records if r.name == "vlcot_grpo.fast_rollout"]
    assert warned == [
        f"{engine.compile_failure}. compile_step was left unset: the decode steps run uncompiled from now on"
    ]
    assert got.completion_ids == want.completion_ids == again.completion_ids
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


def test_fused_copies_that_do_not_fit_fall_back_when_left_unset(presets, monkeypatch, caplog):
    """fuse_projections unset is a best effort: where it resolves on (CUDA graphs; forced here on the CPU) and the
    fused weight copies run out of memory (injected at the third copy), nothing is swapped, a warning says why, the
    rollout runs unfused with the same tokens, and the engine's later calls do not try again. Set to true, the error
    is raised and names the option; the model's modules are untouched either way."""
    import logging

    from vlcot_grpo import fusion

    model, backend = presets.build_preset("tiny", torch.device("cpu"), torch.float32)
    presets.add_chain_hooks(model, backend)
    prompts = presets.make_prompts(backend, 1, 32)
    kw = {"max_new_tokens": 30, "engine": "static", "guidance_scale": 3.0, "do_sample": False}
    want = RolloutEngine(model, backend, _config(fuse_projections=False, **kw)).generate(prompts, 2)
    before = {name: id(m) for name, m in model.named_modules()}
    monkeypatch.setattr(RolloutConfig, "resolved_fuse", lambda self, device: self.fuse_projections is not False)
    copies, concatenated = [], fusion.concatenated_weights

    def third_copy_fails(linears):
        copies.append(len(linears))
        if len(copies) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 MiB")
        return concatenated(linears)

    monkeypatch.setattr(fusion, "concatenated_weights", third_copy_fails)
    engine = RolloutEngine(model, backend, _config(**kw))
    with caplog.at_level(logging.WARNING, logger="vlcot_grpo.fast_rollout"):
        got = engine.generate(prompts, 2)
    again = engine.generate(prompts, 2)
    assert got.completion_ids == want.completion_ids == again.completion_ids
    assert len(copies) == 3  # the second call did not try again
    assert engine.fuse_failure == "OutOfMemoryError: CUDA out of memory. Tried to allocate 96.00 MiB"
    warned = [r.message for r in caplog.records if r.name == "vlcot_grpo.fast_rollout"]
    assert len(warned) == 1 and "fuse_projections was left unset" in warned[0] and engine.fuse_failure in warned[0]
    copies.clear()
    with pytest.raises(torch.OutOfMemoryError) as raised:
        RolloutEngine(model, backend, _config(fuse_projections=True, **kw)).generate(prompts, 2)
    assert (
        "set it false" in "".join(raised.value.__notes__) and "rollout_fuse_projections" in raised.value.__notes__[0]
    )
    assert {name: id(m) for name, m in model.named_modules()} == before


@pytest.mark.parametrize("kernel", KERNELS)
def test_step_reads_nothing_from_the_host(tiny, photo, kernel, small_pieces):
    """Every aten op of a decode step (the model's forward included): none reads a value back to the host or builds
    a tensor from host data, and no copy changes device. On CUDA each of those would be a sync or a host-to-device
    copy, which a captured graph cannot hold."""
    from torch.utils._python_dispatch import TorchDispatchMode

    forbidden = ("_local_scalar_dense", "lift_fresh", "nonzero", "masked_select", "unique", "item")

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bad = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if any(name in str(func) for name in forbidden) or kwargs.get("device") not in (None, torch.device("cpu")):
                self.bad.append(str(func))
            if "_to_copy" in str(func) and "device" in kwargs:
                self.bad.append(f"{func} to {kwargs['device']}")
            return func(*args, **kwargs)

    model, _, backend = tiny
    prompt = encode_prompt(backend, photo, (16, 16)) + [backend.tag_ids["<rough_image>"]]
    config = _config(max_new_tokens=8, guidance_scale=3.0, image_top_k=-1, text_top_p=0.9, **_attention(kernel))
    decoder = StaticDecoder(RolloutEngine(model, backend, config), torch.device("cpu"))
    decoder.prepare([prompt], 2)
    ops = Ops()
    with _split_attention(model), ops:
        for _ in range(3):
            decoder.step(decoder.read_bucket(0), 16)
    assert ops.bad == []


@pytest.mark.parametrize("kernel", KERNELS)
def test_step_on_meta_tensors_makes_no_host_tensor(kernel, small_pieces):
    """The decode step of a model on the meta device (shapes, no values): reading a value would raise, and no op may
    produce a tensor on the host. A proxy for CUDA-graph capture, where host tensors mean host-to-device copies."""
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from vlcot_grpo.models import load_backend
    from vlcot_grpo.models.tiny import build_tiny_emu3

    meta = torch.device("meta")
    with meta:
        model, tokenizer = build_tiny_emu3()
    backend = load_backend(model.eval(), tokenizer)
    text = model.config.text_config
    head_dim, vocab = text.hidden_size // text.num_attention_heads, backend.vocab_size

    def prefill(prompt_ids, device):  # transformers' prefill reads mask values; the step is what is checked here
        n, width = len(prompt_ids), max(len(p) for p in prompt_ids)
        shape = (n, text.num_key_value_heads, width, head_dim)
        zeros = [torch.zeros(shape, device=device) for _ in range(2 * text.num_hidden_layers)]
        cache = SimpleNamespace(layers=[SimpleNamespace(keys=k, values=v) for k, v in zip(zeros[::2], zeros[1::2])])
        attn = torch.ones(n, width, dtype=torch.long, device=device)
        return cache, attn, torch.arange(width, device=device).expand(n, width), torch.zeros(n, vocab, device=device)

    class HostTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(x, torch.Tensor) and x.device.type != "meta" for x in tree_flatten(out)[0]):
                self.found.append(str(func))
            return out

    config = _config(max_new_tokens=8, guidance_scale=3.0, image_top_k=-1, text_top_p=0.9, **_attention(kernel))
    engine = RolloutEngine(model, backend, config)
    engine.prefill_prompts = prefill
    decoder = StaticDecoder(engine, meta)
    decoder.prepare([backend.bos_token_ids + [backend.tag_ids["<rough_image>"]]], 2)
    host = HostTensors()
    with _split_attention(model), host:
        decoder.step(decoder.caches.row.length, decoder.caches.guide.length)
    assert host.found == []


def _split_attention(model):
    from vlcot_grpo.attention import ATTENTION_NAME, attention_implementation

    return attention_implementation(model, ATTENTION_NAME)


def test_attention_implementation_restored_and_engine_choice(tiny, photo):
    model, _, backend = tiny
    before = model.config.text_config._attn_implementation
    RolloutEngine(model, backend, _config(max_new_tokens=3, engine="static")).generate([[5, 6]], 1)
    assert model.config.text_config._attn_implementation == before
    default = RolloutConfig()  # "auto": the static engine wherever CUDA graphs exist
    assert default.resolved_engine(torch.device("cpu")) == "reference"
    assert default.resolved_engine(torch.device("cuda")) == "static"
    assert RolloutConfig(engine="reference").resolved_engine(torch.device("cuda")) == "reference"
    assert RolloutConfig(engine="static").resolved_engine(torch.device("cpu")) == "static"
    # quantized weights: "auto" keeps the reference engine (their kernels are unchecked inside CUDA graphs)
    assert default.resolved_engine(torch.device("cuda"), quantized=True) == "reference"
    assert RolloutConfig(engine="static").resolved_engine(torch.device("cuda"), quantized=True) == "static"
    # compile_step unset: compiled decode steps exactly where they are captured as CUDA graphs
    assert default.resolved_compile(torch.device("cuda")) and not default.resolved_compile(torch.device("cpu"))
    assert not RolloutConfig(cuda_graphs=False).resolved_compile(torch.device("cuda"))
    assert RolloutConfig(compile_step=True).resolved_compile(torch.device("cpu"))
    assert not RolloutConfig(compile_step=False).resolved_compile(torch.device("cuda"))
    # fuse_projections unset: likewise, with CUDA graphs only (its weight copy is not worth it on the CPU)
    assert default.resolved_fuse(torch.device("cuda")) and not default.resolved_fuse(torch.device("cpu"))
    assert not RolloutConfig(cuda_graphs=False).resolved_fuse(torch.device("cuda"))
    assert RolloutConfig(fuse_projections=True).resolved_fuse(torch.device("cpu"))
    assert not RolloutConfig(fuse_projections=False).resolved_fuse(torch.device("cuda"))
    # share_prompt_cache unset: wherever it applies (sdpa, 16-aligned buckets, several generations), never an error
    assert default.shares_prompt_cache(5) and not default.shares_prompt_cache(1)
    assert not RolloutConfig(decode_attention="split").shares_prompt_cache(5)
    assert not RolloutConfig(kv_bucket=24).shares_prompt_cache(5)
    assert not RolloutConfig(share_prompt_cache=False).shares_prompt_cache(5)
    assert RolloutConfig(share_prompt_cache=True).shares_prompt_cache(5)
    # decode_attention: a kernel measured slower and removed is named as such in the error, for old configs
    with pytest.raises(
        ValueError, match=r"got 'varlen' \('varlen' was removed: slower than 'sdpa', docs/benchmarks.md"
    ):
        RolloutConfig(decode_attention="varlen")
    with pytest.raises(ValueError, match=r"one of \('sdpa', 'split'\), got 'flash'$"):
        RolloutConfig(decode_attention="flash")
    from vlcot_grpo.rollout import has_quantized_weights

    assert not has_quantized_weights(model)
    layer = torch.nn.Linear(2, 2)
    layer.weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.uint8), requires_grad=False)
    assert has_quantized_weights(torch.nn.Sequential(torch.nn.Linear(2, 2), layer))
    with pytest.raises(ValueError):
        RolloutConfig(engine="fast")


def test_trainer_rollouts_equal_across_engines(tiny_path, tmp_path, monkeypatch):
    """VLCoTGRPOConfig.rollout_engine, rollout_compile, rollout_share_prompt_cache and rollout_fuse_projections reach
    the trainer's engine; one seeded LoRA GRPO step rolls out the same completions through the PEFT model with either
    engine, compiled or not, sharing the prompt cache or not, with fused projections or not (all draw the same
    exponential race)."""
    pytest.importorskip("trl")
    import datasets
    import skimage.data
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoTokenizer, Emu3ForConditionalGeneration

    from vlcot_grpo.config import VLCoTGRPOConfig
    from vlcot_grpo.fusion import decoder_layers
    from vlcot_grpo.trainer import VLCoTGRPOTrainer

    if not _multinomial_is_exponential_race():
        pytest.skip("torch.multinomial draws differently here")
    photo = Image.fromarray(skimage.data.astronaut()).resize((16, 16))
    data = datasets.Dataset.from_dict({"lr_image": [photo, photo]})
    seen, static_runs = {}, []
    run = StaticDecoder.run
    monkeypatch.setattr(StaticDecoder, "run", lambda self, *a, **k: static_runs.append(1) or run(self, *a, **k))
    fused_counts, fuse = [], fast_rollout.fused_projections

    @contextlib.contextmanager
    def counted_fuse(model, *args):
        with fuse(model, *args) as swapped:
            fused_counts.append(swapped)
            yield swapped

    monkeypatch.setattr(fast_rollout, "fused_projections", counted_fuse)
    runs = (
        ("reference", False, False, False),
        ("static", False, False, False),
        ("static", True, False, False),
        ("static", False, True, True),
    )
    for engine, compiled, shared, fused in runs:
        args = VLCoTGRPOConfig(
            output_dir=str(tmp_path / f"{engine}{compiled}{shared}"),
            rollout_engine=engine,
            rollout_compile=compiled,
            rollout_share_prompt_cache=shared,
            rollout_fuse_projections=fused,
            max_completion_length=120,
            num_generations=4,
            per_device_train_batch_size=4,
            max_steps=1,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            image_log_steps=0,
            guidance_scale=2.0,
            seed=0,
            lr_size=16,
            rough_size=8,
            middle_size=16,
            final_size=32,
        )
        config = args.rollout_config()
        assert (config.engine, config.compile_step, config.share_prompt_cache) == (engine, compiled, shared)
        assert config.fuse_projections == fused
        trainer = VLCoTGRPOTrainer(
            model=Emu3ForConditionalGeneration.from_pretrained(tiny_path),
            reward_funcs=[lambda completion_ids, **kw: [len(c) / 100 for c in completion_ids]],
            args=args,
            train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(tiny_path),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.(q_proj|v_proj)"),
        )
        calls = []

        def record(*a, _generate=trainer.engine.generate, _calls=calls, **k):
            _calls.append(_generate(*a, **k))
            return _calls[-1]

        trainer.engine.generate = record
        trainer.train()
        assert all(layer._compiled_call_impl is None for layer in decoder_layers(trainer.model))  # eager training
        seen[engine, compiled, shared, fused] = calls[0].completion_ids
    # a near-tie in one draw (float rounding differs between the attention paths) may change one row
    for other in runs[1:]:
        same = sum(x == y for x, y in zip(seen[other], seen[runs[0]]))
        assert len(seen[other]) == 4 and same >= 3
    assert static_runs == [1, 1, 1]
    # the last run fused q/k/v and gate/up of every layer, its LoRA projections through their merged base layers
    assert fused_counts == [5 * len(decoder_layers(trainer.model))]
    with pytest.raises(ValueError):
        VLCoTGRPOConfig(output_dir=str(tmp_path / "x"), rollout_engine="fast")
    compiled = VLCoTGRPOConfig(output_dir=str(tmp_path / "x"), rollout_compile=True, use_cpu=True, report_to=[])
    assert compiled.rollout_config().compile_step


# ----- GPU (device session): CUDA-graph replay equals the eager step; larger presets -------------------------------
@pytest.mark.parametrize("compiled,shared", [(False, False), (True, False), (False, True), (True, True)])
def test_caches_are_freed_when_generate_returns(tiny, photo, monkeypatch, compiled, shared):
    """The KV buffers and step state live for one generate call only: nothing holds them once it returns (the
    compiled layers' code neither), so the training phase gets their memory back (on CUDA, also the graphs' pool:
    see test_gpu_memory_released)."""
    import gc
    import weakref

    model, _, backend = tiny
    refs = []
    prepare = StaticDecoder.prepare

    def recording_prepare(self, *a, **k):
        prepare(self, *a, **k)
        assert (self.caches.prompt is not None) == shared and self.caches.guide is not None
        refs.extend(weakref.ref(t) for t in [*self.caches.buffers(), self.state["logits"]])

    monkeypatch.setattr(StaticDecoder, "prepare", recording_prepare)
    config = _config(
        max_new_tokens=40, engine="static", guidance_scale=3.0, compile_step=compiled, share_prompt_cache=shared
    )
    engine = RolloutEngine(model, backend, config)  # kept alive, as the trainer keeps its engine
    batch = engine.generate(_prompts(backend, photo), 2)
    gc.collect()
    assert batch.completion_ids and refs and all(r() is None for r in refs)


def test_benchmark_attention_options_on_cpu(bench):
    """The attention-options section's plumbing on the CPU: the engine's masked SDPA over a left-padded row matches
    attention on exact slices; the CUDA-only variable-length ops give error entries, not a crash."""
    from vlcot_grpo.models.tiny import build_tiny_emu3

    model, _ = build_tiny_emu3()
    results = bench.attention_options(model, 3, torch.device("cpu"), lengths=(64,), total=128, reps=1)
    options = results[64]
    assert options["sdpa + mask (the engine's)"]["max_err"] < 1e-5
    assert options["sdpa + mask (the engine's)"]["tbs"] > 0
    assert "error" in options["flash varlen, seqused_k"] and "error" in options["memory-efficient varlen, seqlen_k"]


def test_benchmark_counts_the_weights_a_step_reads(presets):
    """The roofline's weight bytes: every language-model weight except the input embedding table, of which a step
    reads a few rows (unless it is tied to the output layer, which a step reads whole)."""
    model, _ = presets.build_preset("tiny", torch.device("cpu"), torch.float32)
    table = model.get_input_embeddings().weight
    lm = sum(p.numel() * 4 for n, p in model.named_parameters() if "vqmodel" not in n)
    assert presets.model_bytes(model)[0] == lm - table.numel() * 4
    model.get_output_embeddings().weight = table
    assert presets.model_bytes(model)[0] == sum(
        p.numel() * 4 for n, p in model.named_parameters() if "vqmodel" not in n
    )


def test_benchmark_pure_7b_preset_has_the_papers_shape(presets):
    """Built on the meta device (no memory): Chameleon 7B with PURE's vocabulary and LlamaGen VQ-8 at its published
    shape, and PURE's image token counts at the paper's sizes."""
    model, backend = presets.build_preset("pure-7b", torch.device("meta"), torch.bfloat16)
    assert type(model).__name__ == "PureForConditionalGeneration" and backend.vocab_size == 73728
    vq = sum(p.numel() for n, p in model.named_parameters() if n.startswith("image_tokenizer."))
    assert vq == 70_109_835  # LlamaGen VQ-8's parameter count (its VQModel at ch_mult 1, 2, 2, 4)
    assert 7.05e9 < sum(p.numel() for p in model.parameters()) - vq < 7.1e9
    assert [len(backend.image_template(*backend.grid_for(s, s))) for s in (128, 256, 512)] == [276, 1060, 4164]
    weights, kv_token = presets.model_bytes(model)
    assert weights == 2 * (sum(p.numel() for p in model.parameters()) - vq - 73728 * 4096)  # bf16, no VQ, no lookup
    assert kv_token == 2 * 32 * 32 * 128 * 2


@pytest.mark.parametrize("preset, language_model", [("janus-1b", (1.6e9, 1.7e9)), ("janus-7b", (6.85e9, 6.95e9))])
def test_benchmark_janus_presets_have_janus_pros_shape(presets, preset, language_model):
    """Built on the meta device: DeepSeek-LLM's 1.x B and 6.9 B language models with Janus-Pro's 102400-row text table,
    LlamaGen VQ-16 (downsample 16, 16384 codes) and the codes' own table, aligner and head; at 128, 256 and 384
    pixels an image is 8², 16² and 24² codes between image start and end."""
    model, backend = presets.build_preset(preset, torch.device("meta"), torch.bfloat16)
    assert type(model).__name__ == "JanusForVLCoT" and backend.text_rows == 102400
    assert backend.vocab_size == 102400 + 16384 and backend.downsample == 16
    params = {n: p.numel() for n, p in model.named_parameters()}
    lm = sum(v for n, v in params.items() if n.startswith(("model.language_model.", "lm_head.")))
    assert language_model[0] < lm < language_model[1]
    assert [len(backend.image_template(*backend.grid_for(s, s))) for s in (128, 256, 384)] == [66, 258, 578]
    weights, _ = presets.model_bytes(model)
    image_path = sum(
        v for n, v in params.items() if n.startswith(("model.generation_head.", "model.generation_aligner."))
    )
    text_lookup = 102400 * model.config.text_config.hidden_size
    assert weights == 2 * (lm - text_lookup + image_path)  # bf16; no VQ, no understanding encoder, no table lookups


def test_benchmark_runs_on_the_janus_family_on_cpu(tmp_path, bench):
    import json

    argv = "--preset janus-tiny --device cpu --lr-size 32 --stage-sizes 16,32,32 --max-new-tokens 200 --stock-steps 4"
    results = bench.main([*argv.split(), "--engines", "static,reference", "--share", "--grpo-step"])
    assert "error" not in json.dumps(results)
    runs = {r["engine"]: r for r in results["runs"]}
    assert runs["static"]["steps"] == runs["reference"]["steps"] > 3 + 6 + 3 + 6  # the forced chain, Janus's layout


def test_benchmark_runs_on_the_pure_family_on_cpu(tmp_path, bench):
    import json

    out = tmp_path / "bench.json"
    argv = "--preset pure-tiny --device cpu --lr-size 32 --stage-sizes 32,32,64 --max-new-tokens 200 --stock-steps 4"
    results = bench.main(
        [*argv.split(), "--engines", "static,reference", "--share", "--grpo-step", "--json", str(out)]
    )
    assert "error" not in json.dumps(results)
    runs = {r["engine"]: r for r in results["runs"]}
    assert runs["static"]["steps"] == runs["reference"]["steps"] > 24 + 24 + 76  # the forced chain, PURE's layout


def test_benchmark_runs_every_section_on_cpu(tmp_path, bench):
    """benchmarks/rollout.py end to end at a small shape: every section the device check runs (kernel comparison with
    the compiled layers, stock generate, both engines, LoRA GRPO step, merged vs unmerged) finishes without an error
    entry. A device
    session is 15 minutes; a script bug must show up here, not there."""
    import json

    out = tmp_path / "bench.json"
    argv = "--preset tiny --device cpu --lr-size 32 --stage-sizes 16,16,32 --max-new-tokens 200 --stock-steps 8"
    kernels = "sdpa,split,sdpa+fused,sdpa+compile,sdpa+shared"
    argv += f" --engines static,reference --compare-attention 32 --compare-kernels {kernels} --share"
    argv += f" --grpo-step --lora-merge-check 32 --profile-step --json {out}"
    results = bench.main(argv.split())
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert "error" not in json.dumps(results)
    runs = {r["engine"]: r for r in results["runs"]}
    assert set(runs) == {"stock generate + guidance", "static", "reference"}
    # the chain hooks force a whole chain: both engines write the same number of steps
    assert runs["static"]["steps"] == runs["reference"]["steps"] > 0
    assert set(results["attention_kernels"]) == set(kernels.split(","))
    assert results["attention_used"] == "sdpa" and results["shared_prompt_cache"]  # --share: the one shared variant
    # the prompt read once for its G rows: fewer bytes than the per-row roofline counts
    assert 0 < runs["static"]["roofline_fraction_read"] < runs["static"]["roofline_fraction"]
    assert results["attention_kernels"]["sdpa+compile"]["compile_seconds"] > 0
    assert results["step_profile"]["eager"]["aten_ops_per_step"] > 0 and results["step_profile"]["eager"]["top"]
    assert results["gemm_bandwidth"]["q+k+v fused"]["tbs"] > 0
    step = results["grpo_step"]
    assert step["rollout_merged"]  # as the trainer rolls out by default
    for correction in ("none", "guided"):  # both log-prob passes, each timed as the trainer runs it
        part = step[correction]
        assert part["step_seconds"] == pytest.approx(
            step["rollout_seconds"] + part["logprob_seconds"] + part["train_seconds"]
        )
    rows = step["guided"]["guidance_rows"]  # the unconditional pass: one row per image of each of the G rows
    assert rows[0] >= 3 * 2 and step["guided_over_none_train"] > 0
    merge = results["lora_rollout_steps_per_s"]
    assert merge["unmerged"] > 0 and merge["merged"] > 0
    assert merge["first_merge_and_restore_seconds"] >= 0 and merge["merge_and_restore_seconds"] >= 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_released(tiny, photo):
    """After a static-engine generate (caches, CUDA graphs and their pool) the allocated memory is back where it was."""
    model, _, backend = tiny
    model.cuda()
    try:
        prompts = _prompts(backend, photo)
        for shared in (False, True):
            config = _config(max_new_tokens=300, engine="static", guidance_scale=3.0, share_prompt_cache=shared)
            RolloutEngine(model, backend, config).generate(prompts, 3)  # first call: lazy CUDA/cuBLAS set-up
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            RolloutEngine(model, backend, config).generate(prompts, 3)
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() <= before + (1 << 20), shared
    finally:
        model.cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_gpu_graphs_equal_eager_tiny(tiny, photo, guidance, kernel, small_pieces):
    model, _, backend = tiny
    model.cuda()
    try:
        hook = backend.logits_module.register_forward_hook(_tag_bias(backend))
        prompts = _prompts(backend, photo)
        out = []
        for graphs in (False, True):
            config = _config(
                max_new_tokens=400,
                engine="static",
                cuda_graphs=graphs,
                guidance_scale=guidance,
                **_attention(kernel),
            )
            gen = torch.Generator("cuda").manual_seed(0)
            out.append(RolloutEngine(model, backend, config).generate(prompts, 3, gen))
        assert out[0].completion_ids == out[1].completion_ids and out[0].sampled_mask == out[1].sampled_mask
        kw = {"max_new_tokens": 400, "do_sample": False, "guidance_scale": guidance, **_attention(kernel)}
        greedy = _both(model, backend, prompts, 2, **kw)
        assert greedy[0].completion_ids == greedy[1].completion_ids
        hook.remove()
    finally:
        model.cpu()


GPU_SIZES = {"rough": (32, 32), "middle": (64, 64), "final": (128, 128)}


def _static_equals_reference(presets, preset, variants, device="cuda"):
    """fp32: the static engine, once per ``variants`` entry (RolloutConfig keywords), writes the reference engine's
    greedy tokens for two prompts with two generations each, with and without guidance (CUDA graphs on CUDA)."""
    model, backend = presets.build_preset(preset, torch.device(device), torch.float32)
    prompts = presets.make_prompts(backend, 2, lr_size=64 if preset == "tiny" else 128)
    presets.add_chain_hooks(model, backend)
    for guidance in (1.0, 3.0):
        kw = {"stage_sizes": GPU_SIZES, "max_new_tokens": 600, "do_sample": False, "guidance_scale": guidance}
        ref = RolloutEngine(model, backend, RolloutConfig(engine="reference", **kw)).generate(prompts, 2)
        for variant in variants:
            fast = RolloutEngine(model, backend, RolloutConfig(engine="static", **variant, **kw)).generate(prompts, 2)
            assert fast.completion_ids == ref.completion_ids and fast.finished == ref.finished, (guidance, variant)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["tiny", "1b", "pure-tiny", "janus-tiny"])
def test_gpu_greedy_equals_reference_preset(preset, presets):
    """The static engine with every kernel, and with the shared prompt cache, writes the reference's greedy tokens."""
    _static_equals_reference(presets, preset, [_attention(kernel) for kernel in KERNELS])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_defaults_equal_reference_1b(presets):
    """1B preset: the static engine as it runs by default on CUDA (CUDA graphs, compiled steps, fused projections,
    the prompt cache shared by a prompt's generations) writes the reference engine's greedy tokens."""
    default, cuda = RolloutConfig(), torch.device("cuda")
    assert default.resolved_compile(cuda) and default.resolved_fuse(cuda) and default.shares_prompt_cache(2)
    _static_equals_reference(presets, "1b", [{}])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_graphs_equal_reference(presets):
    """Tiny preset: the compiled step (Triton kernels) captured as CUDA graphs writes the reference engine's greedy
    tokens with every kernel, with the shared prompt cache and with fused projections."""
    variants = [_attention(kernel) for kernel in KERNELS]
    variants.append({**_attention("sdpa"), "fuse_projections": True})
    _static_equals_reference(presets, "tiny", [{"compile_step": True, **v} for v in variants])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,heads,kv_heads", [(5, 32, 32), (5, 32, 8)])
def test_gpu_split_attention_equals_sdpa(dtype, rows, heads, kv_heads):
    """The "split" kernel at the 7B (and a grouped-query) decode shape, through the private SDPA ops that return
    log-sum-exps (cuDNN for bf16, memory-efficient for fp32), against torch's SDPA; rows whose visible positions
    leave whole pieces masked included."""
    from vlcot_grpo.attention import attend, compute_units, num_splits, split_bias

    gen = torch.Generator("cuda").manual_seed(0)
    length, dim = 4608, 128
    q = torch.randn(rows, heads, 1, dim, generator=gen, device="cuda").to(dtype)
    k = torch.randn(rows, kv_heads, length + 512, dim, generator=gen, device="cuda").to(dtype).narrow(2, 0, length)
    v = torch.randn(rows, kv_heads, length + 512, dim, generator=gen, device="cuda").to(dtype).narrow(2, 0, length)
    allowed = torch.ones(rows, length, dtype=torch.bool, device="cuda")
    allowed[0, 4200:] = False  # not yet written
    allowed[1, :3000] = False  # left padding
    allowed[2, 1:] = False  # one visible position
    splits = num_splits(rows * kv_heads, length, compute_units("cuda"))
    assert splits > 1
    bias = torch.zeros(rows, 1, 1, length, dtype=dtype, device="cuda").masked_fill(~allowed[:, None, None], -torch.inf)
    rep = heads // kv_heads
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=bias, scale=0.1
    )
    got = attend(q, k, v, split_bias(allowed, kv_heads, splits, dtype), 0.1, "split")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prompts,heads,kv_heads", [(1, 32, 32), (2, 32, 8)])
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_shared_prompt_attention_equals_sdpa(dtype, prompts, heads, kv_heads, compiled):
    """share_prompt_cache's attention at the 7B paper shape (one prompt of 4191 tokens in 33 pieces of 128, G = 5,
    300 generated tokens in a 512-long read) and a grouped-query one, through cuDNN (bf16) or the memory-efficient
    kernel (fp32) and the merge, eager or compiled (Triton)."""
    from vlcot_grpo.attention import compiled_merge

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    merge = compiled_merge if compiled else None
    shape = {"prompts": prompts, "g": 5, "heads": heads, "kv_heads": kv_heads, "width": 4224, "n": 512, "own": 300}
    _check_shared_attention("cuda", dtype, **shape, pieces=33, dim=128, tol=tol, merge=merge)
