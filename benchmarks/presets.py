"""The benchmark presets: model shapes with random weights, prompts, and hooks that make a random model write the
whole chain. Shared by ``benchmarks/rollout.py`` and the tests (``tests/conftest.py``'s ``presets``)."""

from __future__ import annotations

import torch

from vlcot_grpo.models import load_backend
from vlcot_grpo.models.tiny import TINY_FAMILIES

PRESETS = {
    # Emu3 presets: a VQ shape of their own, with random weights (the shipped tiny VQ fits the tiny model only)
    "tiny": {
        "max_position_embeddings": 16384,
        "vq_channel_multiplier": (1, 1, 2, 2),
        "codebook_size": 256,
        "vq_weights": "random",
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "intermediate_size": 5632,
        "max_position_embeddings": 16384,
        "codebook_size": 32768,
        "vq_channel_multiplier": (1, 1, 2, 2),
        "vq_weights": "random",
    },
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 16384,
        "codebook_size": 73609,  # + 119 text/special tokens = the reference's vocabulary of 73728
        "vq_channel_multiplier": (1, 1, 2, 2),
        "vq_weights": "random",
    },
    "pure-tiny": {"family": "pure", "max_position_embeddings": 16384},
    "janus-tiny": {"family": "janus", "max_position_embeddings": 16384, "vq_channel_multiplier": (1, 1, 2, 2, 4)},
    # Janus-Pro-1B / -7B: DeepSeek-LLM language models (multi-head attention, vocabulary 102400), LlamaGen VQ-16
    "janus-1b": {
        "family": "janus",
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "intermediate_size": 5632,
        "max_position_embeddings": 16384,
        "codebook_size": 16384,
        "vq_base_channels": 128,
        "vq_channel_multiplier": (1, 1, 2, 2, 4),
        "vq_latent_channels": 256,
        "vq_num_res_blocks": 2,
        "vocab_size": 102400,  # Janus-Pro's text table; the tiny tokenizer's ids are its first rows
    },
    "janus-7b": {
        "family": "janus",
        "hidden_size": 4096,
        "num_hidden_layers": 30,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 16384,
        "codebook_size": 16384,
        "vq_base_channels": 128,
        "vq_channel_multiplier": (1, 1, 2, 2, 4),
        "vq_latent_channels": 256,
        "vq_num_res_blocks": 2,
        "vocab_size": 102400,
    },
    "pure-7b": {
        "family": "pure",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 16384,
        "codebook_size": 16384,  # LlamaGen VQ-8 (vq_ds8_c2i.pt)
        "vq_base_channels": 128,
        "vq_latent_channels": 256,
        "vq_num_res_blocks": 2,
        "vocab_size": 73728,  # PURE's published vocabulary; filler tokens stand in for the text it does not need
    },
}
#: copy bandwidth (TB/s) used for the roofline when the device is named so and --bandwidth is not given:


def build_preset(name: str, device: torch.device, dtype: torch.dtype):
    """(model, backend) of a preset with random weights, built directly on ``device`` and cast to ``dtype``."""
    fields = dict(PRESETS[name])
    spec_class, build = TINY_FAMILIES[fields.pop("family", "emu3")]
    with torch.device(device):
        model, tokenizer = build(spec_class(**fields))
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, load_backend(model, tokenizer)


def make_prompts(backend, n: int, lr_size: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts: a short instruction, a random LR image's tokens, ``<rough_image>``; lengths differ by a few."""
    gen = torch.Generator().manual_seed(seed)
    grid = backend.grid_for(lr_size, lr_size)
    prompts = []
    for i in range(n):
        codes = torch.randint(0, backend.codebook_size, grid, generator=gen)
        text = backend.encode_text("Restore this image" + "!" * i + ": ")
        image = backend.codes_to_token_ids(codes).tolist()
        prompts.append(backend.bos_token_ids + text + image + [backend.tag_ids["<rough_image>"]])
    return prompts


def load_checkpoint(path: str, device: torch.device, dtype: torch.dtype):
    """(model, backend) of a saved model folder, through the loader real checkpoints take."""
    from transformers import AutoTokenizer

    from vlcot_grpo.models import load_model

    model = load_model(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model, load_backend(model, AutoTokenizer.from_pretrained(path))


def photo_prompts(backend, n: int, lr_size: int, prompt: str | None = None) -> list[list[int]]:
    """``n`` VLCoT prompts (``vlcot.encode_prompt``, with ``prompt``: the trained one) of the demo's degraded
    training photos, as a trained model is prompted."""
    from vlcot_grpo.data.demo import build_demo_dataset
    from vlcot_grpo.vlcot import DEFAULT_PROMPT, encode_prompt

    photos = [row["lr_image"] for row in build_demo_dataset()]
    return [
        encode_prompt(backend, photos[i % len(photos)], (lr_size, lr_size), prompt or DEFAULT_PROMPT) for i in range(n)
    ]


def add_chain_hooks(model, backend):
    """Make a random model write the whole chain: after ``</rough_image>`` / ``</middle_image>`` the next stage's
    opening tag gets +100. Graph-capturable (tensor ops only). Returns the hook handles."""
    table = torch.full((backend.vocab_size,), -1, dtype=torch.long)
    table[backend.tag_ids["</rough_image>"]] = backend.tag_ids["<middle_image>"]
    table[backend.tag_ids["</middle_image>"]] = backend.tag_ids["<final_image>"]
    table = table.to(next(model.parameters()).device)
    last = {}

    def pre(module, args, kwargs):
        last["ids"] = args[0] if args else kwargs["input"]

    def post(module, inputs, output):  # every position of the forward (a Jacobi window has several)
        nxt = table[last["ids"][:, -output.shape[1] :]]  # the prefill keeps only its last logits
        bonus = torch.zeros_like(output)
        bonus.scatter_(-1, nxt.clamp(min=0)[..., None], (nxt >= 0).to(bonus.dtype)[..., None] * 100.0)
        return output + bonus

    return [
        model.get_input_embeddings().register_forward_pre_hook(pre, with_kwargs=True),
        backend.logits_module.register_forward_hook(post),
    ]


#: What a decode step does not read: each family's VQ model; Janus's understanding encoder and its aligner, and the
#: codes' input table, of which a step looks up one row.
VQ_MODULES = (
    "model.vqmodel.",
    "image_tokenizer.",
    "model.vision_model.",
    "model.aligner.",
    "model.generation_embeddings.",
)


def model_bytes(model) -> tuple[int, int]:
    """(language-model weight bytes read per decode step, KV bytes per token per row). A step looks up a few rows
    of the input embedding table, so that table counts only where it is also the output layer (tied)."""
    lookup = model.get_input_embeddings().weight
    tied = lookup is model.get_output_embeddings().weight
    weights = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not n.startswith(VQ_MODULES) and (tied or p is not lookup)
    )
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return weights, 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem
