"""LlamaGen's VQ on any code grid: the nearest-code step and the decode of PURE's VQ-8 and Janus's VQ-16.

Both families' image tokenizers are LlamaGen VQ models (``tokenizer/tokenizer_image/vq_model.py``), and transformers
holds their weights in ``JanusVQVAE``. Two of its steps do not fit here, so these functions replace them:

* the nearest code: LlamaGen l2-normalises both the feature and the codebook before the distance
  (``codebook_l2_norm``); ``JanusVQVAEVectorQuantizer.forward`` does not, and picks another code for ~17 % of the
  positions of VQ-8 (docs/models.md);
* the decode: ``JanusVQVAE.decode`` accepts only its configured square grid (``num_patches``²); the VLCoT stages
  and the low-quality prompt image each have their own. The encoder and decoder are convolutional and take any grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_codebook(vq) -> torch.Tensor:
    """The l2-normalised codebook of ``vq`` (a ``JanusVQVAE``), read through the embedding module's call so that
    ZeRO-3 gathers the partitioned weight."""
    embedding = vq.quantize.embedding
    index = torch.arange(embedding.num_embeddings, device=embedding.weight.device)
    return F.normalize(embedding(index), p=2, dim=-1)


@torch.no_grad()
def encode_to_codes(vq, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` floats in [-1, 1] -> ``(B, H / d, W / d)`` codes, as LlamaGen's ``VQModel.encode``."""
    param = vq.quant_conv.weight
    features = vq.quant_conv(vq.encoder(pixels.to(param.device, param.dtype)))
    z = F.normalize(features.permute(0, 2, 3, 1), p=2, dim=-1)
    codebook = l2_codebook(vq)
    # LlamaGen's distance, term by term (|z|² + |e|² - 2 z·e), so that near-ties break as upstream's do
    distance = z.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1) - 2 * z @ codebook.T
    return distance.argmin(-1)


@torch.no_grad()
def decode_codes(vq, codes: torch.Tensor) -> torch.Tensor:
    """``(B, rows, cols)`` codes -> ``(B, 3, rows * d, cols * d)`` floats, as LlamaGen's ``VQModel.decode_code``."""
    quantized = l2_codebook(vq)[codes.to(vq.quant_conv.weight.device)].permute(0, 3, 1, 2)
    return vq.decoder(vq.post_quant_conv(quantized))
