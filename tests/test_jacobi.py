"""Speculative Jacobi decoding (vlcot_grpo.jacobi) against the sequential engines: the reference engine's tokens
under greedy decoding, its per-position distribution when sampling (chi-square, with and without guidance and
top-k), and a wrong acceptance rule that those tests catch."""

import pytest
import torch
from test_fast_rollout import _chi2_same, _config, _prompts, _tag_bias, hooks  # noqa: F401

from vlcot_grpo import jacobi
from vlcot_grpo.jacobi import JacobiDecoder
from vlcot_grpo.rollout import RolloutConfig, RolloutEngine
from vlcot_grpo.vlcot import encode_prompt, parse_completions


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _generate(model, backend, prompts, g, seed=None, **kw):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return RolloutEngine(model, backend, _config(**kw)).generate(prompts, g, gen)


def _jacobi(window=4, **kw):
    return {"engine": "static", "image_decoding": "jacobi", "jacobi_window": window, **kw}


def _chain_hooks(backend):
    """After ``</rough_image>`` / ``</middle_image>`` the next stage's opening tag wins (rough, middle, final with no
    text between), at every position of a forward: a window's logits then follow the same rule as one token's."""
    table = torch.full((backend.vocab_size,), -1, dtype=torch.long)
    table[backend.tag_ids["</rough_image>"]] = backend.tag_ids["<middle_image>"]
    table[backend.tag_ids["</middle_image>"]] = backend.tag_ids["<final_image>"]
    last = {}

    def pre(module, args, kwargs):
        last["ids"] = args[0] if args else kwargs["input"]

    def hook(module, inputs, output):
        nxt = table.to(output.device)[last["ids"][:, -output.shape[1] :]]  # the prefill keeps the last logits
        bonus = torch.zeros_like(output)
        bonus.scatter_(-1, nxt.clamp(min=0)[..., None], (nxt >= 0).to(output.dtype)[..., None] * 100.0)
        return output + bonus

    return pre, hook


def _copy_codes(backend, code_bias=12.0):
    """Logits that favour the code fed last (a model whose next code is predictable, as trained ones are after a
    while): drafts drawn from the window's own predictions are then often accepted."""
    codes = backend.image_code_mask.nonzero().squeeze(-1)
    last = {}

    def pre(module, args, kwargs):
        last["ids"] = args[0] if args else kwargs["input"]

    def hook(module, inputs, output):
        ids = last["ids"][:, -output.shape[1] :]
        is_code = backend.image_code_mask.to(ids.device)[ids]
        bonus = torch.zeros_like(output)
        bonus.scatter_(-1, ids[..., None], (is_code.to(output.dtype) * code_bias)[..., None])
        return output + bonus

    assert len(codes) > 2
    return pre, hook


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("window", [2, 5])
def test_greedy_jacobi_writes_the_reference_tokens(tiny_family, hooks, photo, guidance, shared, window):  # noqa: F811
    model, _, backend = tiny = tiny_family
    hooks(_tag_bias(backend), model=model)
    pre, hook = _chain_hooks(backend)
    hooks(hook, pre_embed=pre, model=model)
    prompts = _prompts(backend, photo, tiny.lr)
    kw = {"max_new_tokens": 700, "do_sample": False, "guidance_scale": guidance, "stage_sizes": tiny.sizes}
    ref = _generate(model, backend, prompts, 2, engine="reference", **kw)
    fast = _generate(model, backend, prompts, 2, share_prompt_cache=shared, **_jacobi(window), **kw)
    assert fast.completion_ids == ref.completion_ids
    assert fast.sampled_mask == ref.sampled_mask and fast.finished == ref.finished
    assert fast.stage_tokens == ref.stage_tokens
    assert (
        all(fast.finished)
        and sum(
            len(p.blocks) for p in parse_completions(backend, fast.completion_ids, tiny.grids, decode_images=False)
        )
        >= 8
    )
    assert fast.decoding["forward_passes_per_image_token"] <= 1.0
