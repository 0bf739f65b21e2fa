"""Upscale images with a trained model, and evaluate upscaled images against HR references.

    vlcot-grpo upscale --model DIR [--adapter DIR] --input IMG_OR_DIR --out DIR [--lr-size 512 ...]
    vlcot-grpo evaluate --sr-dir DIR --hr-dir DIR [--metrics psnr ssim ...] [--out results.json]

``upscale`` runs the same rollout engine as training: the model writes the whole chain, and the final image is the
output. A chain without a well-formed final image is reported with what went wrong and counted as a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vlcot_grpo.data.dataset import ACCEPTED_FORMATS, BadImageError, open_rgb_image
from vlcot_grpo.evaluation import evaluate_main  # noqa: F401  (public here too)
from vlcot_grpo.models import load_backend, load_model
from vlcot_grpo.rollout import ENGINES, RolloutConfig, RolloutEngine
from vlcot_grpo.vlcot import DEFAULT_PROMPT, STAGES, VLCoTParse, encode_prompt, parse_completions

logger = logging.getLogger("vlcot_grpo.inference")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Upscaled:
    source: str
    parse: VLCoTParse
    final: Image.Image | None = None
    problems: list[str] = field(default_factory=list)


def load_for_inference(model_path: str, adapter: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, backend) ready for generation; a LoRA adapter is merged in."""
    from transformers import AutoTokenizer

    model = load_model(model_path, dtype=getattr(torch, dtype))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(
        adapter if adapter and Path(adapter, "tokenizer.json").exists() else model_path
    )
    return model, tokenizer, load_backend(model, tokenizer)


def upscale_images(
    model,
    backend,
    images: list[Image.Image],
    lr_size: int,
    config: RolloutConfig,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    sources: list[str] | None = None,
) -> list[Upscaled]:
    """Run the chain on each image; ``config.stage_sizes['final']`` is the output size."""
    engine = RolloutEngine(model, backend, config)
    grids = {s: backend.grid_for(*config.stage_sizes[s]) for s in STAGES}
    prompts = [encode_prompt(backend, image, (lr_size, lr_size), prompt) for image in images]
    generator = torch.Generator(device=model.device).manual_seed(seed)
    batch = engine.generate(prompts, 1, generator)
    parses = parse_completions(backend, batch.completion_ids, grids)
    sources = sources or [f"image{i}" for i in range(len(images))]
    return [Upscaled(src, p, p.images["final"], list(p.problems)) for src, p in zip(sources, parses)]


def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path} is neither an image file nor a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--input {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def upscale_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlcot-grpo upscale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Checkpoint folder (a full model or the base of --adapter).")
    parser.add_argument("--adapter", help="LoRA adapter folder written by GRPO/SFT; merged into the model.")
    parser.add_argument("--input", required=True, help="An image file or a folder of images.")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--lr-size", type=int, default=512, help="Side the input is resized to before tokenisation.")
    parser.add_argument("--sizes", type=int, nargs=3, default=(128, 256, 512), metavar=("ROUGH", "MIDDLE", "FINAL"))
    parser.add_argument("--max-new-tokens", type=int, default=7000)
    parser.add_argument("--greedy", action="store_true", help="Argmax decoding instead of sampling.")
    parser.add_argument("--temperature", type=float, default=0.9, help="Text and image temperature.")
    parser.add_argument(
        "--image-top-k", type=int, default=-1, help="0 off, > 0 fixed, -1 the paper's entropy-dependent k."
    )
    parser.add_argument("--text-top-k", type=int, default=0, help="Text top-k: 0 off, 1 greedy text (the paper's).")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="Classifier-free guidance (1.0 = off).")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=RolloutConfig.engine,
        help="Rollout engine (see RolloutConfig.engine); the same tokens either way under --greedy.",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Static engine: compile the decode steps (RolloutConfig.compile_step; default: on with CUDA graphs).",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args(argv)

    files = _image_files(Path(args.input))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, _, backend = load_for_inference(args.model, args.adapter, args.dtype, args.device)
    config = RolloutConfig(
        stage_sizes={s: (n, n) for s, n in zip(STAGES, args.sizes)},
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        text_temperature=args.temperature,
        image_temperature=args.temperature,
        image_top_k=args.image_top_k,
        text_top_k=args.text_top_k,
        guidance_scale=args.guidance_scale,
        engine=args.engine,
        compile_step=args.compile,
    )
    from vlcot_grpo.pictures import sample_picture

    failures = 0
    readable, skipped = [], []
    for f in files:  # opened once up front (accepted formats only): a bad file is named and left out, not fatal
        try:
            readable.append((f, open_rgb_image(f)))
        except (BadImageError, OSError) as err:
            skipped.append(f)
            logger.warning("skipping input %s: %s", f, err)
    for start in range(0, len(readable), args.batch_size):
        chunk, images = zip(*readable[start : start + args.batch_size])
        chunk, images = list(chunk), list(images)
        for path, image, result in zip(
            chunk,
            images,
            upscale_images(
                model, backend, images, args.lr_size, config, seed=args.seed + start, sources=[str(f) for f in chunk]
            ),
        ):
            record = {"source": str(path), "texts": result.parse.texts, "problems": result.problems}
            if result.final is not None:
                result.final.save(out / f"{path.stem}.png")
                record["final"] = str(out / f"{path.stem}.png")
            else:
                failures += 1
                logger.warning("%s: no well-formed final image: %s", path, "; ".join(result.problems))
            sample_picture(image, result.parse.images, result.parse.texts, {}).save(out / f"{path.stem}_chain.png")
            (out / f"{path.stem}.json").write_text(json.dumps(record, indent=2))
    print(f"upscaled {len(readable) - failures} of {len(files)} images into {out}")
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable inputs (accepted formats: {', '.join(ACCEPTED_FORMATS)}): "
            + ", ".join(str(f) for f in skipped)
        )
    return 1 if failures or skipped else 0
