"""``vlcot-grpo prepare-data``: turn a folder of HR images into a VLCoT dataset saved with ``save_to_disk``.

The top-level ``vlcot-grpo`` command registers :func:`add_prepare_data_arguments` and calls
:func:`run_prepare_data`; ``python -m vlcot_grpo.data.cli --hr-dir DIR --out DIR`` runs it directly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from vlcot_grpo.data.dataset import BadImageError, build_vlcot_dataset_with_summary
from vlcot_grpo.data.degradations import DegradationConfig


def add_prepare_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prepare-data`` options to ``parser`` (returned for chaining)."""
    parser.add_argument("--hr-dir", required=True, help="Folder of high-resolution images (searched recursively).")
    parser.add_argument("--out", required=True, help="Output folder for Dataset.save_to_disk.")
    parser.add_argument("--scale", type=int, default=4, help="Super-resolution factor (default: 4).")
    parser.add_argument("--hr-size", type=int, default=512, help="Side of the square HR image (default: 512).")
    parser.add_argument(
        "--lr-size",
        type=int,
        default=None,
        help="Side of the stored LR image (default: hr-size / scale; e.g. 512 to store it at the model's canvas).",
    )
    parser.add_argument(
        "--stage-sizes",
        type=int,
        nargs=3,
        metavar=("ROUGH", "MIDDLE", "FINAL"),
        default=None,
        help="Sides of the rough / middle / final targets (default: hr-size/4, hr-size/2, hr-size).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Global seed (default: 0).")
    parser.add_argument("--num-proc", type=int, default=1, help="Worker processes (default: 1).")
    parser.add_argument("--strict", action="store_true", help="Stop with an error at the first bad input file.")
    parser.add_argument("--prompt-file", default=None, help="Text file with the prompt (must contain <|image|>).")
    parser.add_argument("--cache-dir", default=None, help="Cache of processed images (default: ~/.cache/vlcot_grpo).")
    parser.add_argument(
        "--small-images",
        choices=("skip", "upscale"),
        default="skip",
        help="What to do with images smaller than hr-size (default: skip).",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="Refuse images with more pixels (decompression-bomb guard; default: PIL's limit, ~89 Mpx).",
    )
    parser.add_argument(
        "--degradation-config",
        default=None,
        help="JSON file with DegradationConfig fields overriding the Real-ESRGAN defaults.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out folder.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"prepare-data: error: {message}", file=sys.stderr)
    return code


def run_prepare_data(args: argparse.Namespace) -> int:
    """Build and save the dataset; print the summary. Returns the process exit code (0 = success)."""
    hr_dir = Path(args.hr_dir)
    if not hr_dir.is_dir():
        return _fail(f"--hr-dir {hr_dir} is not a folder", 2)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        return _fail(f"--out {out} exists and is not empty; pass --overwrite to replace it", 2)

    prompt = None
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            return _fail(f"cannot read --prompt-file {args.prompt_file}: {error}", 2)

    degradation_config = None
    if args.degradation_config:
        try:
            degradation_config = DegradationConfig.from_dict(json.loads(Path(args.degradation_config).read_text()))
        except (OSError, ValueError, TypeError) as error:
            return _fail(f"invalid --degradation-config {args.degradation_config}: {error}", 2)

    try:
        dataset, summary = build_vlcot_dataset_with_summary(
            hr_dir,
            hr_size=args.hr_size,
            scale=args.scale,
            lr_size=args.lr_size,
            stage_sizes=tuple(args.stage_sizes) if args.stage_sizes else None,
            seed=args.seed,
            prompt=prompt,
            degradation_config=degradation_config,
            small_images=args.small_images,
            max_image_pixels=args.max_image_pixels,
            strict=args.strict,
            num_proc=args.num_proc,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except BadImageError as error:
        return _fail(f"bad input file (--strict): {error}")
    except ValueError as error:
        return _fail(str(error), 2)

    print(summary.format())
    if len(dataset) == 0:
        return _fail(f"no usable images in {hr_dir}; nothing saved")
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    dataset.save_to_disk(str(out))
    print(f"saved {len(dataset)} samples with columns {dataset.column_names} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlcot-grpo prepare-data", description=__doc__.splitlines()[0])
    add_prepare_data_arguments(parser)
    return run_prepare_data(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
