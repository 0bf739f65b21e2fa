"""Chunked completion log-probs (vlcot_grpo.logprobs): the same values and gradients as a plain full-vocabulary
computation, and what the backward pass keeps is a small fraction of one float32 copy of the logits."""

import pytest
import torch

from vlcot_grpo.logprobs import completion_logps

VOCAB = 50
CODES = torch.arange(VOCAB) < 30  # ids 0-29 are image codes
TEXT = (torch.arange(VOCAB) >= 30) & (torch.arange(VOCAB) < 45)  # 45-49: layout tokens, in neither support


def _plain(logits, targets, restricted, text_t=0.7, image_t=1.3):
    """Position by position, as the method defines it."""
    logps = torch.zeros(targets.shape)
    entropy = torch.zeros(targets.shape)
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            target = int(targets[b, t])
            is_code = bool(CODES[target])
            row = logits[b, t].float() / (image_t if is_code else text_t)
            if restricted:
                allowed = (CODES if is_code else TEXT).clone()
                allowed[target] = True
                row = row.masked_fill(~allowed, float("-inf"))
            log_probs = torch.log_softmax(row, -1)
            logps[b, t] = log_probs[target]
            entropy[b, t] = -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum()
    return logps, entropy


def _ours(logits, targets, restricted, chunk, entropy=True):
    return completion_logps(
        logits,
        targets,
        code_mask=CODES,
        text_mask=TEXT,
        text_temperature=0.7,
        image_temperature=1.3,
        restricted=restricted,
        compute_entropy=entropy,
        chunk_tokens=chunk,
    )


@pytest.mark.parametrize("restricted", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_values_and_gradients_equal_the_plain_computation(restricted, chunk):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 11, VOCAB, generator=g) * 3
    targets = torch.randint(0, VOCAB, (3, 11), generator=g)
    targets[0, :3] = torch.tensor([46, 47, 49])  # forced layout tokens: outside both supports
    # a view of a larger tensor, as the trainer passes logits[:, :-1]
    full = torch.cat([base, torch.randn(3, 1, VOCAB, generator=g)], 1).requires_grad_(True)
    logps, entropy = _ours(full[:, :-1], targets, restricted, chunk)
    expected, expected_entropy = _plain(full[:, :-1].detach(), targets, restricted)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logps).all() and (logps <= 0).all()

    weights = torch.randn(3, 11, generator=g)
    (grad,) = torch.autograd.grad((logps * weights).sum() + entropy.sum(), full)
    reference = full.detach().clone().requires_grad_(True)
    lp_ref, ent_ref = _plain(reference[:, :-1], targets, restricted)
    (grad_ref,) = torch.autograd.grad((lp_ref * weights).sum() + ent_ref.sum(), reference)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


def test_no_grad_path_and_empty_completion():
    logits = torch.randn(2, 5, VOCAB)
    targets = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        logps, entropy = _ours(logits, targets, True, 2, entropy=False)
    assert entropy is None and logps.shape == (2, 5) and not logps.requires_grad
    torch.testing.assert_close(logps, _plain(logits, targets, True)[0], atol=1e-5, rtol=1e-5)
    empty, _ = _ours(logits[:, :0], targets[:, :0], True, 2, entropy=False)
    assert empty.shape == (2, 0)


def _saved_bytes(fn, logits):
    """Bytes the autograd graph keeps for backward outside ``logits``' own storage."""
    saved = []

    def pack(t):
        shared = t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        saved.append(0 if shared else t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_backward_keeps_a_small_fraction_of_the_logits():
    """What makes a paper-shape batch fit: the plain computation keeps more than a float32 copy of the logits for
    backward (log-softmax output, masks); the chunked one keeps views of the logits and a few small tensors."""
    logits = torch.randn(2, 400, 1000, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 1000, (2, 400))
    codes, text = torch.arange(1000) < 600, torch.arange(1000) >= 600
    one_copy = logits.numel() * 4

    def plain():
        scores = logits.float() / 0.9
        allowed = torch.where(codes[targets][..., None], codes, text)
        log_probs = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        return log_probs.gather(-1, targets[..., None])

    def chunked():
        kw = {"code_mask": codes, "text_mask": text, "text_temperature": 0.9, "image_temperature": 0.9}
        return completion_logps(logits, targets, chunk_tokens=128, **kw)

    assert _saved_bytes(plain, logits) > one_copy
    assert _saved_bytes(chunked, logits) < 0.02 * one_copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_peak_memory_and_values_bf16():
    """On the GPU, bf16 logits of 2 x 4096 positions x 65536 ids (1 GB): forward + backward of the chunked log-probs
    peak at less than half of what the plain computation needs, and the values agree."""
    logits = torch.randn(2, 4096, 65536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 65536, (2, 4096), device="cuda")
    codes = torch.arange(65536, device="cuda") < 32768

    def plain():
        allowed = torch.where(codes[targets][..., None], codes, ~codes)
        allowed = allowed | torch.nn.functional.one_hot(targets, 65536).bool()
        log_probs = torch.log_softmax((logits.float() / 0.9).masked_fill(~allowed, float("-inf")), -1)
        return log_probs.gather(-1, targets[..., None]).squeeze(-1)

    def chunked():
        kw = {"code_mask": codes, "text_mask": ~codes, "text_temperature": 0.9, "image_temperature": 0.9}
        return completion_logps(logits, targets, **kw)[0]

    peaks, values = {}, {}
    for name, fn in (("plain", plain), ("chunked", chunked)):
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        out.sum().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        values[name] = out.detach()
        del out
    assert peaks["chunked"] < 0.5 * peaks["plain"], peaks
    torch.testing.assert_close(values["chunked"], values["plain"], atol=1e-4, rtol=1e-4)


def test_sampled_logps_equal_the_sampler_written_out():
    """``sampled_logps`` (chunked, checkpointed) against the sampler written out position by position: guidance from
    each target's unconditional row, top-k with the given k, temperatures, text top-k; values and gradients."""
    from vlcot_grpo.logprobs import sampled_logps

    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 9, VOCAB, generator=gen) * 3).requires_grad_(True)
    uncond = (torch.randn(3, 4, VOCAB, generator=gen) * 3).requires_grad_(True)
    codes, text = CODES.nonzero().squeeze(-1), TEXT.nonzero().squeeze(-1)
    targets = torch.stack([codes[torch.randint(30, (9,), generator=gen)] for _ in range(2)])
    targets[:, 6:] = text[:3]  # text targets at the end of each row
    targets[1, 5] = 47  # a forced layout token: outside both supports, finite all the same
    top_k = torch.tensor([[5, 0, 3, 30, 1, 8, 0, 0, 0], [2, 4, 6, 0, 9, 0, 0, 0, 0]])
    index = torch.full((2, 9), -1)
    index[0, :4] = torch.arange(4)  # row 0's first four codes: guided by unconditional row 0
    index[1, 1:5] = torch.arange(8, 12)  # row 1: by unconditional row 2
    settings = dict(
        guidance_scale=2.5,
        image_temperature=0.8,
        image_top_k=-1,
        text_temperature=0.6,
        text_top_k=2,
        text_top_p=1.0,
        text_min_p=0.0,
    )
    ours, _ = sampled_logps(
        logits,
        targets,
        code_mask=CODES,
        text_mask=TEXT,
        settings=settings,
        top_k=top_k,
        uncond_logits=uncond,
        uncond_index=index,
        chunk_tokens=4,
    )
    flat = uncond.reshape(-1, VOCAB)
    expected = torch.zeros(2, 9)
    for b in range(2):
        for t in range(9):
            target = int(targets[b, t])
            row = torch.log_softmax(logits[b, t], -1)
            if CODES[target]:
                if index[b, t] >= 0:
                    u = torch.log_softmax(flat[index[b, t]], -1)
                    row = u + 2.5 * (row - u)
                row = row.masked_fill(~CODES, float("-inf"))
                k = int(top_k[b, t])
                if k:  # the target stays in the support even where it is not among the k best
                    drop = (row < row.topk(k).values[-1]) & (torch.arange(VOCAB) != target)
                    row = row.masked_fill(drop, float("-inf"))
                row = row / 0.8
            else:
                allowed = TEXT.clone()
                allowed[target] = True
                row = logits[b, t].masked_fill(~allowed, float("-inf"))
                kth = row[TEXT].topk(2).values[-1]
                row = row.masked_fill((row < kth) & (torch.arange(VOCAB) != target), float("-inf")) / 0.6
            expected[b, t] = torch.log_softmax(row, -1)[target]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(ours.sum(), (logits, uncond))
    want = torch.autograd.grad(expected.sum(), (logits, uncond))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert uncond.grad is None and want[1].abs().sum() > 0  # the unconditional branch is trained too
