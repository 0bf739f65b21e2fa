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


#: positions of codes late in the rows of a 4x4 middle image (5 forced header tokens, a row end after every 4)
CODE_POSITIONS = [7, 12, 17, 22]
SAMPLED = [
    {"image_top_k": 12, "image_temperature": 0.7, "guidance_scale": 3.0},
    {"image_top_k": -1, "image_temperature": 1.0, "guidance_scale": 1.0},
    {"image_top_k": 0, "image_temperature": 1.0, "guidance_scale": 2.0, "share_prompt_cache": True},
]


def _code_samples(tiny, hooks, photo, kw, rows=600):  # noqa: F811
    """Codes at ``CODE_POSITIONS`` of a middle image, from the reference engine and from Jacobi decoding with
    different seeds (independent samples), on a model whose codes repeat the last one often: drafts are kept often
    and rejected often, so both branches of the rule shape the sample."""
    model, _, backend = tiny
    pre, hook = _copy_codes(backend, code_bias=3.0)
    hooks(lambda module, inputs, output: output * 4.0, model=model)
    hooks(hook, pre_embed=pre, model=model)
    prompt = encode_prompt(backend, photo, (16, 16)) + [backend.tag_ids["<middle_image>"]]
    kw = {"max_new_tokens": CODE_POSITIONS[-1] + 1, **kw}
    ref = _generate(model, backend, [prompt], rows, seed=0, engine="reference", **kw)
    fast = _generate(model, backend, [prompt], rows, seed=1, **_jacobi(4), **kw)
    return ref, fast


@pytest.mark.parametrize("kw", SAMPLED, ids=["fixed-top-k-guided", "entropy-top-k", "guided-shared-prompt"])
def test_sampled_codes_have_the_reference_distribution(tiny, hooks, photo, kw):  # noqa: F811
    ref, fast = _code_samples(tiny, hooks, photo, kw)
    stats = fast.decoding
    assert 0.3 < stats["accepted_drafts_per_step"] and stats["forward_passes_per_image_token"] > 0.3, stats
    for pos in CODE_POSITIONS:
        a = [c[pos] for c in ref.completion_ids]
        b = [c[pos] for c in fast.completion_ids]
        assert len(set(a)) > 2, "degenerate: the test would not see a distribution"
        assert _chi2_same(a, b) > 1e-3, pos


WRONG_RULES = {
    "keep-every-draft": {"accepts": lambda p, q, u: torch.ones_like(p, dtype=torch.bool)},
    "ratio-inverted": {"accepts": lambda p, q, u: u * p < q},
}


@pytest.mark.parametrize("rule", list(WRONG_RULES))
def test_a_wrong_acceptance_rule_fails_the_distribution_test(tiny, hooks, photo, monkeypatch, rule):  # noqa: F811
    """The distribution test above can fail: with the acceptance or the residual rule replaced by a wrong one,
    the chi-square test tells the two engines apart at some position."""
    for name, wrong in WRONG_RULES[rule].items():
        monkeypatch.setattr(jacobi, name, wrong)
    ref, fast = _code_samples(tiny, hooks, photo, SAMPLED[1], rows=1500)
    p_values = [
        _chi2_same([c[pos] for c in ref.completion_ids], [c[pos] for c in fast.completion_ids])
        for pos in CODE_POSITIONS
    ]
    assert min(p_values) < 1e-3, p_values


@pytest.mark.parametrize("shared", [False, True])
def test_jacobi_step_traces_without_graph_breaks(tiny, photo, shared):
    """The window step is one graph for torch.compile (no host reads, no branching on tensor values): what
    CUDA-graph capture needs, one graph per (window, bucket pair). The traced step writes the eager tokens."""
    model, _, backend = tiny
    prompt = encode_prompt(backend, photo, (16, 16)) + [backend.tag_ids["<middle_image>"]]
    config = RolloutConfig(
        **{"stage_sizes": {"rough": (8, 8), "middle": (16, 16), "final": (32, 32)}, "kv_bucket": 16},
        **_jacobi(3, max_new_tokens=20, guidance_scale=3.0, image_top_k=-1, share_prompt_cache=shared),
    )
    engine = RolloutEngine(model, backend, config)
    results = []
    for compiled in (False, True):
        decoder = JacobiDecoder(engine, torch.device("cpu"))
        decoder.prepare([prompt], 2)
        step = decoder.step
        if compiled:
            torch._dynamo.reset()
            step = torch.compile(decoder.step, backend="eager", fullgraph=True)
        gen = torch.Generator().manual_seed(0)
        with decoder.decoding():
            for _ in range(6):
                for name in jacobi.NOISE[:3]:
                    decoder.state[name].exponential_(generator=gen)
                decoder.state["accept_noise"].uniform_(generator=gen)
                step(decoder.read_bucket(0) + 16, 48)
        results.append(decoder.state["tokens"].clone())
    torch._dynamo.reset()
    assert torch.equal(results[0], results[1])
    assert int(decoder.state["lengths"].min()) > 6  # windows kept more than one token a step


def test_jacobi_options_are_checked():
    with pytest.raises(ValueError, match="decode_attention='sdpa'"):
        RolloutConfig(**_jacobi(4, decode_attention="split"))
    with pytest.raises(ValueError, match="reference"):
        RolloutConfig(image_decoding="jacobi", engine="reference")
    with pytest.raises(ValueError, match="jacobi_window"):
        RolloutConfig(**_jacobi(1))
    with pytest.raises(ValueError, match="image_decoding must be one of"):
        RolloutConfig(image_decoding="parallel")


def test_trainer_rolls_out_with_jacobi_and_logs_its_counters(tiny_path, tmp_path):
    """rollout_image_decoding / rollout_jacobi_window reach the trainer's engine through the one option mapping;
    a real GRPO step rolls out with Jacobi decoding and logs forward passes per image token and accepted drafts."""
    import datasets
    import skimage.data
    from PIL import Image
    from transformers import AutoTokenizer, Emu3ForConditionalGeneration

    from vlcot_grpo.config import VLCoTGRPOConfig
    from vlcot_grpo.trainer import VLCoTGRPOTrainer

    photo = Image.fromarray(skimage.data.astronaut()).resize((16, 16))
    args = VLCoTGRPOConfig(
        output_dir=str(tmp_path / "jacobi"),
        rollout_engine="static",
        rollout_image_decoding="jacobi",
        rollout_jacobi_window=4,
        max_completion_length=120,
        num_generations=4,
        per_device_train_batch_size=4,
        max_steps=1,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        image_log_steps=0,
        seed=0,
        lr_size=16,
        rough_size=8,
        middle_size=16,
        final_size=32,
    )
    config = args.rollout_config()
    assert (config.image_decoding, config.jacobi_window) == ("jacobi", 4)
    trainer = VLCoTGRPOTrainer(
        model=Emu3ForConditionalGeneration.from_pretrained(tiny_path),
        reward_funcs=[lambda completion_ids, **kw: [len(c) / 100 for c in completion_ids]],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"lr_image": [photo, photo]}),
        processing_class=AutoTokenizer.from_pretrained(tiny_path),
    )
    trainer.train()
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert 0 < logged["vlcot/forward_passes_per_image_token"] <= 1.0
    assert logged["vlcot/accepted_drafts_per_step"] >= 0


def test_benchmark_jacobi_section_on_cpu(tmp_path, bench, tiny_path):
    """benchmarks/rollout.py --jacobi-windows: sequential and each window in one run, on a preset's random weights
    and on a saved checkpoint (prompted with the demo's photos, no chain hooks)."""
    argv = "--preset tiny --device cpu --lr-size 16 --stage-sizes 8,16,32 --max-new-tokens 200 --stock-steps 0"
    results = bench.main([*argv.split(), "--engines", "", "--jacobi-windows", "4"])
    section = results["jacobi"]
    assert "error" not in section and [r["window"] for r in section["runs"]] == [1, 4]
    sequential, window = section["runs"]
    assert sequential["forward_passes_per_image_token"] == 1.0 and sequential["accepted_drafts_per_step"] == 0
    # forced layout tokens (row ends, image ends) are drafted exactly, so even random weights keep some drafts
    assert window["forward_passes_per_image_token"] < 1.0 and window["accepted_drafts_per_step"] > 0
    assert window["step_cost"] > 0 and section["weights"] == "random (tiny)"
    results = bench.main([*argv.split(), "--engines", "", "--jacobi-windows", "2", "--checkpoint", str(tiny_path)])
    assert "error" not in results["jacobi"] and results["jacobi"]["weights"] == str(tiny_path)
