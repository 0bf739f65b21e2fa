"""Upscale images with a trained model, and evaluate upscaled images against HR references.

    vlcot-grpo upscale --model DIR [--adapter DIR] --input IMG_OR_DIR --out DIR [--lr-size 512 ...]
    vlcot-grpo evaluate --sr-dir DIR --hr-dir DIR [--metrics psnr ssim ...] [--out results.json]  (evaluation.py)

``upscale`` runs the same rollout engine as training: the model writes the whole chain, and the final image is the
output. Its sizes, prompt and sampling default to those saved with the checkpoint at training time
(``vlcot_settings.json``). A chain without a well-formed final image, or an input that cannot be read, is reported
with what went wrong and counted; ``--strict`` makes either an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vlcot_grpo.data.dataset import ACCEPTED_FORMATS, BadImageError, open_rgb_image
from vlcot_grpo.evaluation import evaluate_main  # noqa: F401  (public here too)
from vlcot_grpo.models import load_backend
from vlcot_grpo.rollout import RolloutConfig, RolloutEngine
from vlcot_grpo.vlcot import DEFAULT_PROMPT, STAGES, VLCoTParse, encode_prompt, parse_completions

logger = logging.getLogger("vlcot_grpo.inference")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Upscaled:
    source: str
    parse: VLCoTParse
    final: Image.Image | None = None
    problems: list[str] = field(default_factory=list)


def load_for_inference(
    model_path: str,
    adapter: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    check_base: bool = True,
):
    """(model, tokenizer, backend) ready for generation; a LoRA adapter (``adapter``, or ``model_path`` itself when
    it is an adapter folder) is merged in, after checking that it was trained on this base."""
    from vlcot_grpo.loading import load_pretrained

    model, tokenizer = load_pretrained(model_path, adapter, dtype=dtype, device=device, check_base=check_base)
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
    return upscale_batch(model, backend, images, lr_size, config, prompt, seed, sources)[0]


def upscale_batch(model, backend, images, lr_size, config, prompt=DEFAULT_PROMPT, seed=0, sources=None):
    """``upscale_images`` and the batch's decoding counters (``RolloutBatch.decoding``: empty unless Jacobi)."""
    engine = RolloutEngine(model, backend, config)
    grids = {s: backend.grid_for(*config.stage_sizes[s]) for s in STAGES}
    prompts = [encode_prompt(backend, image, (lr_size, lr_size), prompt) for image in images]
    generator = torch.Generator(device=model.device).manual_seed(seed)
    batch = engine.generate(prompts, 1, generator)
    parses = parse_completions(backend, batch.completion_ids, grids)
    sources = [str(s) for s in sources] if sources else [f"image{i}" for i in range(len(images))]
    results = [Upscaled(src, p, p.images["final"], list(p.problems)) for src, p in zip(sources, parses)]
    return results, dict(batch.decoding)


def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path} is neither an image file nor a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--input {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def output_names(files: list[Path]) -> dict[Path, str]:
    """The output stem of each input: its own stem, or (when two inputs share one, as a.png and a.jpg do) the stem
    with its extension (a_png, a_jpg), so that no output overwrites another."""
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
    return {f: f.stem if stems[f.stem] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}" for f in files}


#: what upscale uses where neither a flag nor the checkpoint's vlcot_settings.json says: the paper's settings
PAPER_DEFAULTS = {
    "lr_size": 512,
    "stage_sizes": {"rough": [128, 128], "middle": [256, 256], "final": [512, 512]},
    "prompt": DEFAULT_PROMPT,
    "temperature": 0.9,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "image_temperature": 0.9,
    "image_top_k": -1,
    "guidance_scale": 1.0,
    "max_new_tokens": 7000,
}


def resolve_settings(args, saved: dict) -> tuple[dict, dict]:
    """Each setting from its flag, else the checkpoint's saved settings, else ``PAPER_DEFAULTS``; and where each
    came from ("flag", "checkpoint" or "default")."""
    saved_flat = {k: saved[k] for k in ("lr_size", "stage_sizes", "prompt") if k in saved}
    saved_flat.update({k: v for k, v in saved.get("sampling", {}).items() if v is not None})
    flags = {
        "lr_size": args.lr_size,
        "stage_sizes": dict(zip(STAGES, ([n, n] for n in args.sizes))) if args.sizes else None,
        "prompt": args.prompt,
        "temperature": args.temperature,
        "top_k": args.text_top_k,
        "top_p": args.top_p,
        "image_temperature": args.image_temperature,
        "image_top_k": args.image_top_k,
        "guidance_scale": args.guidance_scale,
        "max_new_tokens": args.max_new_tokens,
    }
    values, sources = {}, {}
    for key, default in PAPER_DEFAULTS.items():
        if flags.get(key) is not None:
            values[key], sources[key] = flags[key], "flag"
        elif key in saved_flat:
            values[key], sources[key] = saved_flat[key], "checkpoint"
        else:
            values[key], sources[key] = default, "default"
    return values, sources


#: upscale flags that set a RolloutConfig engine option directly: flag -> RolloutConfig field (help taken from it)
ENGINE_FLAGS = {
    "--engine": "engine",
    "--compile": "compile_step",
    "--image-decoding": "image_decoding",
    "--jacobi-window": "jacobi_window",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlcot-grpo upscale",
        description=__doc__.split("\n\n")[0]
        + " Sizes, prompt and sampling default to what the checkpoint was trained with (its vlcot_settings.json), "
        "else to the paper's settings; each flag overrides.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Checkpoint folder or Hub id (a full model, the base of --adapter, or an adapter).",
    )
    parser.add_argument("--adapter", help="LoRA adapter folder written by GRPO/SFT; merged into the model.")
    parser.add_argument(
        "--ignore-base-mismatch",
        action="store_true",
        help="Load an adapter on a base other than the one it was trained on (refused by default).",
    )
    parser.add_argument("--input", required=True, help="An image file or a folder of images.")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--overwrite", action="store_true", help="Replace outputs of an earlier run in --out.")
    parser.add_argument("--lr-size", type=int, help="Side the input is resized to before tokenisation.")
    parser.add_argument("--sizes", type=int, nargs=3, metavar=("ROUGH", "MIDDLE", "FINAL"), help="Stage sides.")
    parser.add_argument(
        "--prompt", help="Instruction with the image placeholder <|image|> (default: the trained one)."
    )
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--greedy", action="store_true", help="Argmax decoding instead of sampling.")
    parser.add_argument("--temperature", type=float, help="Text temperature.")
    parser.add_argument("--image-temperature", type=float, help="Image-code temperature.")
    parser.add_argument("--top-p", type=float, help="Text nucleus top-p (1.0 = off).")
    parser.add_argument("--image-top-k", type=int, help="0 off, > 0 fixed, -1 the paper's entropy-dependent k.")
    parser.add_argument("--text-top-k", type=int, help="Text top-k: 0 off, 1 greedy text (the paper's).")
    parser.add_argument("--guidance-scale", type=float, help="Classifier-free guidance (1.0 = off).")
    _add_engine_flags(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="Exit 1 when an input is skipped or a chain fails.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    return parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """``ENGINE_FLAGS``, each with its RolloutConfig field's default, help and choices."""
    fields = {f.name: f for f in dataclasses.fields(RolloutConfig)}
    for flag, name in ENGINE_FLAGS.items():
        source = fields[name]
        kwargs = {"default": source.default, "help": f"{source.metadata['help']} (RolloutConfig.{name})"}
        if source.type in ("bool | None", bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(source.default)
            if "choices" in source.metadata:
                kwargs["choices"] = source.metadata["choices"]
        parser.add_argument(flag, dest=name, **kwargs)


def rollout_config(args, values: dict) -> RolloutConfig:
    """The engine settings of an upscale run: resolved ``values`` (``resolve_settings``) and the engine flags."""
    return RolloutConfig(
        stage_sizes={s: tuple(values["stage_sizes"][s]) for s in STAGES},
        max_new_tokens=values["max_new_tokens"],
        do_sample=not args.greedy,
        text_temperature=values["temperature"],
        text_top_k=values["top_k"] or 0,
        text_top_p=values["top_p"],
        text_min_p=values["min_p"] or 0.0,
        image_temperature=values["image_temperature"],
        image_top_k=values["image_top_k"],
        guidance_scale=values["guidance_scale"],
        **{name: getattr(args, name) for name in ENGINE_FLAGS.values()},
    )


def _check_outputs(out: Path, names: dict[Path, str], overwrite: bool) -> None:
    existing = [out / f"{n}.png" for n in names.values() if (out / f"{n}.png").exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"--out {out} already holds {len(existing)} of this run's outputs ({existing[0].name}, ...): pass "
            "--overwrite to replace them, or choose another --out"
        )


def _print_settings(values: dict, sources: dict, saved: dict) -> None:
    where = (
        "from the checkpoint's vlcot_settings.json where no flag is given"
        if saved
        else "no vlcot_settings.json: the paper's defaults where no flag is given"
    )
    shown = ", ".join(f"{k}={v if k != 'prompt' else repr(v[:40] + '...')} [{sources[k]}]" for k, v in values.items())
    print(f"upscale settings ({where}): {shown}")


def _read_inputs(files: list[Path]) -> tuple[list, list]:
    """(path, image) of each readable input, and (path, why) of each other one: named and left out, not fatal."""
    readable, skipped = [], []
    for f in files:  # opened once up front (accepted formats only)
        try:
            readable.append((f, open_rgb_image(f)))
        except Exception as err:  # noqa: BLE001 - whatever a broken file raises, the others still run
            skipped.append((f, f"{type(err).__name__}: {err}" if not isinstance(err, BadImageError) else str(err)))
            logger.warning("skipping input %s: %s", f, skipped[-1][1])
    return readable, skipped


def _save_result(out: Path, name: str, path: Path, image: Image.Image, result: Upscaled) -> bool:
    """Write the final image, the chain picture and the record; whether the chain gave a final image."""
    from vlcot_grpo.pictures import sample_picture

    record = {"source": str(path), "texts": result.parse.texts, "problems": result.problems}
    if result.final is not None:
        result.final.save(out / f"{name}.png")
        record["final"] = str(out / f"{name}.png")
    else:
        logger.warning("%s: no well-formed final image: %s", path, "; ".join(result.problems))
    sample_picture(image, result.parse.images, result.parse.texts, {}).save(out / f"{name}_chain.png")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    return result.final is not None


def decoding_summary(counts: dict[str, float]) -> str | None:
    """The Jacobi counters summed over a run's batches, as one line (None for sequential decoding)."""
    if not counts.get("image_tokens"):
        return None
    passes = counts["image_forward_passes"] / counts["image_tokens"]
    accepted = counts["accepted_drafts"] / max(counts["row_steps"], 1)
    return (
        f"jacobi decoding: {passes:.3f} forward passes per image token, {accepted:.2f} accepted drafts per step "
        f"({int(counts['image_tokens'])} image tokens)"
    )


def _report(out: Path, files: list, failures: list, skipped: list, names: dict, counts: dict) -> None:
    print(f"upscaled {len(files) - len(skipped) - len(failures)} of {len(files)} images into {out}")
    if failures:
        print(f"no well-formed final image for {len(failures)} (see their .json): " + ", ".join(map(str, failures)))
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable inputs (accepted formats: {', '.join(ACCEPTED_FORMATS)}): "
            + "; ".join(f"{f}: {why}" for f, why in skipped)
        )
    renamed = [f"{f.name} -> {n}.png" for f, n in names.items() if n != f.stem]
    if renamed:
        print("inputs sharing a name were written apart: " + ", ".join(renamed))
    summary = decoding_summary(counts)
    if summary:
        print(summary)


def upscale_main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from tqdm.auto import tqdm

    from vlcot_grpo.loading import is_adapter
    from vlcot_grpo.saved_settings import read_settings

    files = _image_files(Path(args.input))
    out = Path(args.out)
    names = output_names(files)
    _check_outputs(out, names, args.overwrite)
    adapter = args.adapter or (args.model if is_adapter(args.model) else None)
    saved = read_settings(adapter) or read_settings(args.model if Path(args.model).is_dir() else None)
    values, sources = resolve_settings(args, saved)
    if "<|image|>" not in values["prompt"]:
        raise ValueError(f"--prompt must contain the image placeholder '<|image|>': {values['prompt'][:200]!r}")
    config = rollout_config(args, values)  # checks the engine options before the model loads
    _print_settings(values, sources, saved)
    out.mkdir(parents=True, exist_ok=True)
    model, _, backend = load_for_inference(
        args.model, args.adapter, args.dtype, args.device, check_base=not args.ignore_base_mismatch
    )
    readable, skipped = _read_inputs(files)
    failures, counts = [], {}
    bar = tqdm(total=len(readable), desc="upscale", unit="img", disable=args.no_progress)
    for start in range(0, len(readable), args.batch_size):
        chunk, images = (list(t) for t in zip(*readable[start : start + args.batch_size]))
        results, decoding = upscale_batch(
            model, backend, images, values["lr_size"], config, values["prompt"], args.seed + start, chunk
        )
        for name, value in decoding.items():
            counts[name] = counts.get(name, 0.0) + value
        for path, image, result in zip(chunk, images, results):
            if not _save_result(out, names[path], path, image, result):
                failures.append(path)
        bar.update(len(chunk))
    bar.close()
    _report(out, files, failures, skipped, names, counts)
    return 1 if args.strict and (failures or skipped) else 0
