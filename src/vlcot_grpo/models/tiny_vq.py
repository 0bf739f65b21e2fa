"""A small trained VQ tokenizer for the tiny Emu3: reproducible from a seed, shipped inside the package.

With random VQ weights every picture the tiny model writes or reads is noise, so the fidelity reward and the
pictures of the demo measure nothing. :func:`train_tiny_vq` trains transformers' ``Emu3VQVAE`` of the tiny shape
(:func:`~vlcot_grpo.models.tiny.tiny_emu3_vq_config`) on random crops of the demo's *training* photos at the scales
the demo and tests encode them (whole photos shrunk to 16-64 pixels, and larger); the held-out photos
(:data:`HELDOUT_PHOTOS`) are never seen, so :func:`reconstruction_psnr` on them measures generalisation.

The loss is a VQ-VAE's (van den Oord et al., 2017): L1 + L2 reconstruction, codebook and 0.25 x commitment terms, a
straight-through estimator through the nearest-code step, and codes unused for a while restarted on encoder
features of the current batch (otherwise a 256-code book collapses onto a few dozen codes). The forward pass is
``Emu3VQVAE.encode``/``decode``'s, with the quantiser written out so that gradients flow.

Reproduce the shipped weights (``tiny_emu3_vq.safetensors`` next to this file; its README says how they were made)::

    python -m vlcot_grpo.models.tiny_vq --out src/vlcot_grpo/models/tiny_emu3_vq.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: The weights ``build_tiny_emu3`` loads by default (fp16 safetensors in this package).
WEIGHTS_FILE = "tiny_emu3_vq.safetensors"

#: Never trained on, by the VQ or (those with annotations) by the demo's SFT and GRPO: scikit-image's bundled
#: photos whose docstrings state CC0 or no known copyright restrictions (camera, coins, immunohistochemistry, brick,
#: gravel, cell, grass). moon and colorwheel state no licence, so they are not used.
HELDOUT_PHOTOS = ("camera", "coins", "immunohistochemistry", "brick", "gravel", "cell", "grass")


@dataclass
class TinyVQTrainConfig:
    """Settings of :func:`train_tiny_vq`; the defaults made the shipped weights."""

    steps: int = field(default=3000, metadata={"help": "Optimiser steps."})
    batch_size: int = field(default=16, metadata={"help": "Crops per step."})
    crop: int = field(default=32, metadata={"help": "Crop side in pixels (a multiple of the downsample)."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Adam learning rate (cosine decay to 5 %)."})
    commitment: float = field(default=0.25, metadata={"help": "Commitment loss weight."})
    restart_every: int = field(default=100, metadata={"help": "Steps between dead-code restarts (0: never)."})
    restart_until: float = field(default=0.8, metadata={"help": "No restarts after this fraction of the steps."})
    short_sides: tuple[int, ...] = field(
        default=(32, 48, 64, 96, 128, 192, 256),
        metadata={"help": "Each photo is resized to these short sides before cropping (the demo's 16-64 px scale)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initial weights, the crops and the restarts."})


def training_photo_names() -> list[str]:
    """The demo's training photos (split ``train`` in ``demo_annotations.json``)."""
    from vlcot_grpo.data.demo import demo_annotations

    return [entry["name"] for entry in demo_annotations("train")]


def heldout_photo(name: str) -> Image.Image:
    """A held-out scikit-image photo as RGB (grey ones are repeated over the three channels)."""
    import skimage.data

    pixels = np.asarray(getattr(skimage.data, name)())
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return Image.fromarray(pixels[..., :3].astype(np.uint8))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1], the range the backends feed the VQ model."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def _pyramid(images: list[Image.Image], short_sides: tuple[int, ...], crop: int) -> list[torch.Tensor]:
    levels = []
    for image in images:
        for side in short_sides:
            scale = side / min(image.size)
            size = (max(crop, round(image.width * scale)), max(crop, round(image.height * scale)))
            levels.append(to_pixels(image.resize(size, Image.Resampling.LANCZOS)))
    return levels


def _crops(levels: list[torch.Tensor], batch: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(batch):
        level = levels[int(torch.randint(len(levels), (1,), generator=generator))]
        top = int(torch.randint(level.shape[1] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(level.shape[2] - crop + 1, (1,), generator=generator))
        piece = level[:, top : top + crop, left : left + crop]
        if int(torch.randint(2, (1,), generator=generator)):
            piece = piece.flip(-1)
        out.append(piece)
    return torch.stack(out)


def build_vq(spec=None, seed: int = 0):
    """A randomly initialised ``Emu3VQVAE`` of the tiny shape ``spec`` (default ``TinyEmu3Spec()``)."""
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    from vlcot_grpo.models.tiny import TinyEmu3Spec, tiny_emu3_vq_config

    torch.manual_seed(seed)
    return Emu3VQVAE(Emu3VQVAEConfig(**tiny_emu3_vq_config(spec or TinyEmu3Spec())))


def _features(vq, pixels: torch.Tensor) -> torch.Tensor:
    """Encoder + quant_conv, as ``Emu3VQVAE.encode``: (B, T=1, C, h, w) before the nearest-code step."""
    hidden = vq.encoder(pixels.unsqueeze(1))
    return vq.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)


def _decode(vq, quant: torch.Tensor) -> torch.Tensor:
    """post_quant_conv + decoder on code vectors (B, T, C, h, w), as ``Emu3VQVAE.decode``; returns (B, 3, H, W)."""
    b, t, _, h, w = quant.shape
    post = vq.post_quant_conv(quant.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
    out = vq.decoder(post, quant)
    factor = vq.spatial_scale_factor
    return out.reshape(b, t, vq.config.out_channels, h * factor, w * factor)[:, 0]


def _forward(vq, pixels: torch.Tensor):
    z = _features(vq, pixels)
    b, t, c, h, w = z.shape
    flat = z.permute(0, 1, 3, 4, 2).reshape(-1, c)
    codebook = vq.quantize.embedding.weight
    codes = torch.cdist(flat, codebook).argmin(dim=1)
    q = codebook[codes]
    codebook_loss = F.mse_loss(q, flat.detach())
    commitment_loss = F.mse_loss(flat, q.detach())
    straight = flat + (q - flat).detach()  # gradients skip the argmin
    quant = straight.view(b, t, h, w, c).permute(0, 1, 4, 2, 3)
    recon = _decode(vq, quant)
    return recon, codes, flat, codebook_loss, commitment_loss


def train_tiny_vq(config: TinyVQTrainConfig | None = None, spec=None, log_every: int = 0) -> dict[str, torch.Tensor]:
    """Train the tiny Emu3's VQ model; returns its float32 state dict (keys of ``Emu3VQVAE``). Deterministic for
    ``config.seed`` on one machine and thread count (the CPU kernels' reduction order depends on both)."""
    config = config or TinyVQTrainConfig()
    from vlcot_grpo.data.demo import load_demo_image

    vq = build_vq(spec, config.seed).train()
    levels = _pyramid([load_demo_image(n) for n in training_photo_names()], config.short_sides, config.crop)
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(vq.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))
    )
    size = vq.config.codebook_size
    usage = torch.zeros(size)
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        pixels = _crops(levels, config.batch_size, config.crop, generator)
        recon, codes, flat, codebook_loss, commitment_loss = _forward(vq, pixels)
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + codebook_loss
        loss = loss + config.commitment * commitment_loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        usage += torch.bincount(codes, minlength=size).float()
        if config.restart_every and step % config.restart_every == 0:
            dead = (usage == 0).nonzero().flatten()
            if len(dead) and step <= config.restart_until * config.steps:
                # a dead code gets a random feature of this batch: it is then nearest to something and trains again
                pick = torch.randint(len(flat), (len(dead),), generator=generator)
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = flat.detach()[pick]
            if log_every:
                print(f"[tiny_vq] step {step}: {len(dead)} dead codes restarted")
            usage.zero_()
        if log_every and step % log_every == 0:
            psnr = -10 * math.log10(F.mse_loss(recon.clamp(-1, 1), pixels).item() / 4)
            print(
                f"[tiny_vq] step {step}/{config.steps} loss {loss.item():.4f} crop PSNR {psnr:.2f} dB "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return {key: value.detach().clone() for key, value in vq.eval().state_dict().items()}


def shipped_weights_path() -> Path:
    return Path(str(resources.files("vlcot_grpo.models").joinpath(WEIGHTS_FILE)))


def load_shipped_weights() -> dict[str, torch.Tensor]:
    """The shipped VQ weights as float32 (stored as fp16)."""
    from safetensors.torch import load_file

    return {key: value.float() for key, value in load_file(shipped_weights_path()).items()}


def shipped_weights_metadata() -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(shipped_weights_path(), "pt") as file:
        return dict(file.metadata() or {})


def weights_digest(path: str | Path | None = None) -> str:
    """SHA-256 (first 16 hex digits) of a weights file: recorded in a tiny checkpoint's spec file."""
    return hashlib.sha256(Path(path or shipped_weights_path()).read_bytes()).hexdigest()[:16]


@torch.no_grad()
def reconstruct(vq, image: Image.Image) -> Image.Image:
    """Encode and decode ``image`` through ``Emu3VQVAE.encode``/``decode`` (the backends' path), as 8-bit RGB."""
    pixels = to_pixels(image)[None]
    codes = vq.encode(pixels, torch.tensor([pixels.shape[-2:]]), return_dict=True).image_tokens[0]
    out = vq.decode(codes[None])[0].clamp(-1, 1)
    return Image.fromarray(((out + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB over RGB, 8-bit peak."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    return float(10 * np.log10(255.0**2 / max(np.mean((x - y) ** 2), 1e-12)))


def square(image: Image.Image, size: int) -> Image.Image:
    """Short side to ``size``, centre crop: how the demo data prepares an HR photo."""
    from vlcot_grpo.data.dataset import prepare_hr

    return prepare_hr(image, size, "heldout", small_images="upscale")


def bicubic_same_grid(image: Image.Image, downsample: int) -> Image.Image:
    """The same token budget as the VQ: one value per code position, i.e. bicubic down to the code grid and back
    (each position then carries 24 bits of RGB, a code 8 bits: the budget in positions, not in bits)."""
    small = image.resize((image.width // downsample, image.height // downsample), Image.Resampling.BICUBIC)
    return small.resize(image.size, Image.Resampling.BICUBIC)


def reconstruction_psnr(vq, names=HELDOUT_PHOTOS, size: int = 64) -> dict[str, dict[str, float]]:
    """Per held-out photo at ``size``² (the demo's final stage): PSNR of the VQ's reconstruction and of bicubic
    through the code grid."""
    downsample = vq.vision_spatial_factor
    out = {}
    for name in names:
        hr = square(heldout_photo(name), size)
        out[name] = {"vq": psnr(reconstruct(vq, hr), hr), "bicubic": psnr(bicubic_same_grid(hr, downsample), hr)}
    return out


def save_weights(state: dict[str, torch.Tensor], path: str | Path, config: TinyVQTrainConfig, seconds: float) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "made_by": "python -m vlcot_grpo.models.tiny_vq",
        "train_config": json.dumps(asdict(config)),
        "training_photos": json.dumps(training_photo_names()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "seconds": f"{seconds:.0f}",
    }
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlcot_grpo.models.tiny_vq", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tiny_emu3_vq.safetensors", help="Where to write the fp16 safetensors.")
    defaults = TinyVQTrainConfig()
    for name in ("steps", "batch_size", "crop", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the result depends on it).")
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TinyVQTrainConfig(
        steps=args.steps, batch_size=args.batch_size, crop=args.crop, seed=args.seed, learning_rate=args.learning_rate
    )
    start = time.perf_counter()
    state = train_tiny_vq(config, log_every=args.log_every)
    seconds = time.perf_counter() - start
    path = save_weights(state, args.out, config, seconds)
    vq = build_vq()
    vq.load_state_dict({k: v.to(torch.float16).float() for k, v in state.items()})
    vq.eval()
    scores = reconstruction_psnr(vq)
    for name, row in scores.items():
        print(f"[tiny_vq] held-out {name}: VQ {row['vq']:.2f} dB, bicubic via the code grid {row['bicubic']:.2f} dB")
    mean = {k: float(np.mean([row[k] for row in scores.values()])) for k in ("vq", "bicubic")}
    print(f"[tiny_vq] mean: VQ {mean['vq']:.2f} dB, bicubic {mean['bicubic']:.2f} dB; {seconds:.0f} s; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
