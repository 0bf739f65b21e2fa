"""``vlcot-grpo prepare-data``: turn a folder of HR images into a VLCoT dataset saved with ``save_to_disk``.

The top-level ``vlcot-grpo`` command registers :func:`add_prepare_data_arguments` and calls
:func:`run_prepare_data`; ``python -m vlcot_grpo.data.cli --hr-dir DIR --out DIR`` runs it directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vlcot_grpo.data.dataset import BadImageError, DatasetOptions, build_vlcot_dataset_with_summary
from vlcot_grpo.data.degradations import DegradationConfig

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from vlcot_grpo.data.tagging import ClipTagger


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
    parser.add_argument(
        "--degradations-per-image",
        type=int,
        default=1,
        help="Rows per photo, each with its own degradation (copy k as --seed + k would make it; default: 1).",
    )
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
    tagging = parser.add_argument_group(
        "tagging", "Tags for photos that tags.json (or a sidecar) does not tag: open_clip zero-shot over a vocabulary."
    )
    tagging.add_argument("--tagger", choices=("open_clip",), default=None, help="Tag untagged photos (default: off).")
    tagging.add_argument(
        "--tagger-model",
        default="ViT-B-32",
        help="open_clip architecture name, or a model config JSON file (default: ViT-B-32).",
    )
    tagging.add_argument("--tagger-weights", help="Local open_clip checkpoint for --tagger-model (never downloaded).")
    tagging.add_argument("--tag-vocabulary", help="Text file, one tag per line (default: the bundled everyday list).")
    tagging.add_argument("--tags-per-image", type=int, default=5, help="Best tags kept per photo (default: 5).")
    tagging.add_argument(
        "--tag-min-probability", type=float, default=0.0, help="Drop tags below this zero-shot probability."
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"prepare-data: error: {message}", file=sys.stderr)
    return code


#: written into every dataset folder prepare-data saves: how it was made, and the mark that --overwrite may replace it
MARKER_FILE = "prepare_data.json"
#: what Dataset.save_to_disk writes (a folder of only these was written by an older prepare-data)
_DATASET_FILES = ("dataset_info.json", "state.json")


def _previous(out: Path) -> Path:
    """Where --overwrite keeps the old dataset while the new one is swapped in."""
    return out.parent / f".{out.name}.previous"


def is_prepared_dataset(folder: Path) -> bool:
    """Whether ``folder`` holds a dataset prepare-data wrote (its marker, or only ``save_to_disk``'s files)."""
    if (folder / MARKER_FILE).is_file():
        return True
    names = [p.name for p in folder.iterdir()]
    expected = set(_DATASET_FILES) | {MARKER_FILE}
    return all(n in expected or (n.startswith("data-") and n.endswith(".arrow")) for n in names) and all(
        n in names for n in _DATASET_FILES
    )


def _check_out(hr_dir: Path, out: Path, overwrite: bool) -> str | None:
    """Why ``--out`` may not be written, or None."""
    hr, target = hr_dir.resolve(), out.resolve()
    if target == hr or hr in target.parents:
        return f"--out {out} is the --hr-dir folder or inside it: the dataset would be written among the photos"
    if target in hr.parents:
        return f"--out {out} contains --hr-dir {hr_dir}: --overwrite would delete the photos"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            return f"--out {out} exists and is not empty; pass --overwrite to replace it"
        if not is_prepared_dataset(out):
            return (
                f"--out {out} is not a dataset written by prepare-data (no {MARKER_FILE}, and other files than "
                "Dataset.save_to_disk's): refusing to replace it; choose another folder or empty this one yourself"
            )
    return None


def recover_interrupted(out: Path) -> str | None:
    """Finish what an interrupted ``--overwrite`` left: the old dataset back in place if the new one never arrived,
    leftovers removed. Returns a sentence saying what was done, or None."""
    previous, said = _previous(out), None
    if previous.is_dir():
        if out.exists():
            shutil.rmtree(previous)  # the new dataset arrived; only the clean-up was cut short
        else:
            os.replace(previous, out)
            said = f"an earlier --overwrite of {out} was interrupted; its previous dataset is back in place"
    for partial in out.parent.glob(f".{out.name}.new-*"):
        shutil.rmtree(partial, ignore_errors=True)
    return said


def save_atomically(dataset, out: Path, marker: dict) -> None:
    """Write ``dataset`` next to ``out`` and swap it in, so that at every moment ``out`` holds the old or the new
    dataset complete, or (for the instant between the two renames) the old one waits complete at
    ``.NAME.previous``, which ``recover_interrupted`` (run by every prepare-data) puts back."""
    staging = out.parent / f".{out.name}.new-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    dataset.save_to_disk(str(staging))
    (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True))
    if out.exists():
        os.replace(out, _previous(out))
        os.replace(staging, out)
        shutil.rmtree(_previous(out))
    else:
        os.replace(staging, out)


class _PrepareDataError(Exception):
    """A problem that ends prepare-data with ``message`` and exit ``code`` (2: bad arguments, 1: bad data)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message = message
        self.code = code


def run_prepare_data(args: argparse.Namespace) -> int:
    """Build and save the dataset; print the summary. Returns the process exit code (0 = success)."""
    try:
        hr_dir, out = _checked_paths(args)
        prompt, degradation_config = _read_prompt(args), _read_degradation_config(args)
        tagger = _load_tagger(args)  # before any photo is processed: missing weights fail at once
        dataset = _build(args, hr_dir, prompt, degradation_config)
    except _PrepareDataError as error:
        return _fail(error.message, error.code)
    if tagger is not None:
        from vlcot_grpo.data.tagging import tag_dataset

        dataset, tagged = tag_dataset(dataset, tagger)
        print(f"tagged {tagged} photos with {args.tagger} ({args.tagger_model}, {len(tagger.vocabulary)} tags)")
    _warn_about_untagged(dataset, hr_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    marker = {"hr_dir": str(hr_dir.resolve()), "samples": len(dataset), "arguments": vars(args)}
    save_atomically(dataset, out, json.loads(json.dumps(marker, default=str)))
    print(f"saved {len(dataset)} samples with columns {dataset.column_names} to {out}")
    return 0


def _checked_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(HR folder, output folder) once the sizes are consistent and the output may be written."""
    hr_dir = Path(args.hr_dir)
    if not hr_dir.is_dir():
        raise _PrepareDataError(f"--hr-dir {hr_dir} is not a folder", 2)
    out = Path(args.out)
    if args.lr_size is None and args.hr_size % args.scale:
        raise _PrepareDataError(
            f"--hr-size {args.hr_size} is not a multiple of --scale {args.scale} (the LR image would be "
            f"{args.hr_size / args.scale:.2f} pixels); choose sizes that divide, or set --lr-size",
            2,
        )
    recovered = recover_interrupted(out)
    if recovered:
        print(f"prepare-data: {recovered}", file=sys.stderr)
    problem = _check_out(hr_dir, out, args.overwrite)
    if problem:
        raise _PrepareDataError(problem, 2)
    return hr_dir, out


def _read_prompt(args: argparse.Namespace) -> str | None:
    if not args.prompt_file:
        return None
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise _PrepareDataError(f"cannot read --prompt-file {args.prompt_file}: {error}", 2) from None


def _read_degradation_config(args: argparse.Namespace) -> DegradationConfig | None:
    if not args.degradation_config:
        return None
    try:
        return DegradationConfig.from_dict(json.loads(Path(args.degradation_config).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise _PrepareDataError(f"invalid --degradation-config {args.degradation_config}: {error}", 2) from None


def _load_tagger(args: argparse.Namespace) -> ClipTagger | None:
    if not args.tagger:
        return None
    from vlcot_grpo.data.tagging import ClipTagger, TaggerConfig

    try:
        return ClipTagger(
            TaggerConfig(
                model=args.tagger_model,
                weights=args.tagger_weights,
                vocabulary=args.tag_vocabulary,
                top_k=args.tags_per_image,
                min_probability=args.tag_min_probability,
            )
        )
    except (OSError, ValueError) as error:
        raise _PrepareDataError(str(error), 2) from None


#: DatasetOptions fields that prepare-data's flags of the same name set as they are
_PLAIN_OPTIONS = (
    "hr_size",
    "scale",
    "lr_size",
    "seed",
    "degradations_per_image",
    "small_images",
    "max_image_pixels",
    "strict",
    "num_proc",
    "cache_dir",
)


def _dataset_options(args: argparse.Namespace, prompt, degradation_config) -> DatasetOptions:
    return DatasetOptions(
        **{name: getattr(args, name) for name in _PLAIN_OPTIONS},
        stage_sizes=tuple(args.stage_sizes) if args.stage_sizes else None,
        prompt=prompt,
        degradation_config=degradation_config,
        progress=not args.no_progress,
    )


def _build(
    args: argparse.Namespace, hr_dir: Path, prompt: str | None, degradation_config: DegradationConfig | None
) -> datasets.Dataset:
    """The dataset, after printing the build summary; an error when no image was usable."""
    try:
        dataset, summary = build_vlcot_dataset_with_summary(hr_dir, _dataset_options(args, prompt, degradation_config))
    except BadImageError as error:
        raise _PrepareDataError(f"bad input file (--strict): {error}") from None
    except ValueError as error:
        raise _PrepareDataError(str(error), 2) from None
    print(summary.format())
    if len(dataset) == 0:
        raise _PrepareDataError(f"no usable images in {hr_dir}; nothing saved")
    return dataset


def _warn_about_untagged(dataset: datasets.Dataset, hr_dir: Path) -> None:
    untagged = sum(not tags for tags in dataset["tags"])
    if untagged:
        print(
            f"prepare-data: warning: {untagged} of {len(dataset)} images have no tags, so the understanding reward "
            f'is \'not applicable\' (None) for them: give tags in {hr_dir}/tags.json ({{"photo.png": {{"tags": '
            '["dog", "grass"], "caption": "..."}}) or a photo.json beside each photo, or tag them with --tagger '
            "open_clip (README: Your own photos)",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlcot-grpo prepare-data", description=__doc__.splitlines()[0])
    add_prepare_data_arguments(parser)
    return run_prepare_data(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
