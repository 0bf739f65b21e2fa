"""``vlcot-grpo evaluate``: score SR images against the HR images of the same name, hiding nothing.

Every SR/HR pair is accounted for: scored, or listed with why not (no HR, no SR, unreadable, another size, a metric
that failed), and ``--strict`` makes any of these an error. Metrics are pyiqa's own names, or the paper's column
names (``PAPER_METRICS``), each pinned to one pyiqa variant so that a table compares with the paper's. FID compares
the two folders once (it is a distribution distance, not a per-image score).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vlcot_grpo.data.dataset import BadImageError, open_rgb_image

#: The columns of RealSR-R1's table (REFERENCE-style names, upper case) -> (pyiqa name, options). RealSR-R1 does not
#: say which variants it used; these are pinned so that two runs of this command compare:
#: PSNR and SSIM on the Y channel of YCbCr (the usual super-resolution convention; pyiqa's own `psnr` is RGB and its
#: `ssim` uses YIQ's Y), LPIPS with AlexNet (v0.1), MUSIQ trained on KonIQ, MANIQA trained on PIPAL (the variant of
#: RealSR-R1's own reward; pyiqa's `maniqa` is the KonIQ one, which gives other numbers), TOPIQ no-reference (KonIQ).
PAPER_METRICS: dict[str, tuple[str, dict]] = {
    "PSNR": ("psnr", {"test_y_channel": True, "color_space": "ycbcr"}),
    "SSIM": ("ssim", {"test_y_channel": True, "color_space": "ycbcr"}),
    "LPIPS": ("lpips", {}),
    "DISTS": ("dists", {}),
    "NIQE": ("niqe", {}),
    "MUSIQ": ("musiq", {}),
    "MANIQA": ("maniqa-pipal", {}),
    "CLIPIQA": ("clipiqa", {}),
    "TOPIQ": ("topiq_nr", {}),
    "FID": ("fid", {}),
}
#: ``--metrics paper``: the nine columns of the paper's table (FID is not among them)
PAPER_TABLE = ("PSNR", "SSIM", "LPIPS", "DISTS", "NIQE", "MUSIQ", "MANIQA", "CLIPIQA", "TOPIQ")
#: metrics computed once over the two folders
FOLDER_METRICS = frozenset({"fid", "fid_dinov2", "sfid"})
#: upscale writes these beside each output: never SR images
SR_EXTRA_SUFFIXES = ("_chain",)
STATUSES = ("scored", "missing_hr", "missing_sr", "unreadable", "size_mismatch", "failed")


@dataclass
class MetricSpec:
    name: str  # as the user wrote it
    pyiqa_name: str
    options: dict = field(default_factory=dict)

    @property
    def per_folder(self) -> bool:
        return self.pyiqa_name in FOLDER_METRICS


def resolve_metrics(names: list[str]) -> list[MetricSpec]:
    """pyiqa names as they are, the paper's names pinned (``PAPER_METRICS``), ``paper`` = its whole table; an
    unknown name is an error with the closest known ones."""
    import pyiqa

    available = pyiqa.list_models()
    specs = []
    for name in names:
        if name == "paper":
            specs += resolve_metrics(list(PAPER_TABLE))
        elif name in PAPER_METRICS:
            specs.append(MetricSpec(name, *PAPER_METRICS[name]))
        elif name in available:
            specs.append(MetricSpec(name, name))
        else:
            close = difflib.get_close_matches(name, [*available, *PAPER_METRICS], n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"--metrics {name!r} is neither a pyiqa metric nor one of the paper's names "
                f"({', '.join(PAPER_METRICS)}, or 'paper' for its table){hint}"
            )
    return specs


def image_files(folder: Path, flag: str) -> dict[str, Path]:
    """The image files of ``folder`` by stem; a missing folder or two files of one stem are errors naming ``flag``."""
    from vlcot_grpo.inference import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: no such folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.stem.endswith(SR_EXTRA_SUFFIXES):
            continue
        if path.stem in files:
            raise ValueError(f"{flag} {folder}: {files[path.stem].name} and {path.name} have the same name; keep one")
        files[path.stem] = path
    return files


def _create(spec: MetricSpec, device):
    from vlcot_grpo.rewards.generation import create_metric

    return create_metric(spec.pyiqa_name, device, purpose="evaluate", **spec.options)


def evaluate_folders(
    sr_dir: Path,
    hr_dir: Path,
    metrics: list[str],
    device="cpu",
    resize_hr: bool = False,
    progress: bool = False,
) -> dict:
    """Scores of every SR/HR pair with the same stem: ``mean`` (over the scored pairs), ``folder`` (FID),
    ``per_image`` (one row per stem of either folder, with its ``status``), ``counts`` by status and ``metrics``
    (which pyiqa variant each name is)."""
    from tqdm.auto import tqdm

    specs = resolve_metrics(metrics)
    sr_files, hr_files = image_files(Path(sr_dir), "--sr-dir"), image_files(Path(hr_dir), "--hr-dir")
    # an --sr-dir without images (every chain failed) is not an exception: each HR image is counted missing_sr
    # every metric is created before any pair is scored: missing weights fail at once, naming the files
    created = {s.name: _create(s, device) for s in specs if not s.per_folder}
    per_folder = {s.name: _create(s, device) for s in specs if s.per_folder}
    rows = {}
    for stem in tqdm(sorted(set(sr_files) | set(hr_files)), desc="evaluate", unit="pair", disable=not progress):
        sr, hr = sr_files.get(stem), hr_files.get(stem)
        rows[stem] = {"name": stem, "sr": str(sr or ""), "hr": str(hr or ""), "note": ""}
        rows[stem].update(_score_pair(sr, hr, created, device, resize_hr))
    scored_pairs = [stem for stem, row in rows.items() if row["status"] == "scored"]
    scored = [rows[s] for s in scored_pairs]
    mean = {name: sum(r[name] for r in scored) / len(scored) for name in created} if scored else {}
    folder = {name: _folder_score(m, sr_files, hr_files, scored_pairs) for name, m in per_folder.items()}
    counts = {status: sum(r["status"] == status for r in rows.values()) for status in STATUSES}
    return {
        "mean": mean,
        "folder": folder,
        "counts": counts,
        "pairs": len(rows),
        "per_image": list(rows.values()),
        "metrics": {s.name: {"pyiqa": s.pyiqa_name, "options": s.options} for s in specs},
    }


def _score_pair(sr_path: Path | None, hr_path: Path | None, created: dict, device, resize_hr: bool) -> dict:
    """One pair's ``status``, ``note`` and, when scored, a value per metric. Nothing here raises: a bad pair is
    reported in its row and the others are scored."""
    from torchvision.transforms.functional import to_tensor

    if hr_path is None or sr_path is None:
        return {"status": "missing_hr" if hr_path is None else "missing_sr"}
    try:
        sr, hr = open_rgb_image(sr_path), open_rgb_image(hr_path)
    except (BadImageError, OSError, ValueError) as err:
        return {"status": "unreadable", "note": str(err)}
    row = {}
    if sr.size != hr.size:
        note = f"SR {sr.size[0]}x{sr.size[1]}, HR {hr.size[0]}x{hr.size[1]}"
        if not resize_hr:
            return {"status": "size_mismatch", "note": note + " (--resize-hr scores it on the HR resized)"}
        aspect = abs(sr.size[0] * hr.size[1] - sr.size[1] * hr.size[0]) > 0.01 * sr.size[0] * hr.size[1]
        row["note"] = note + ": HR resized (bicubic)" + (", ASPECT DIFFERS" if aspect else "")
        hr = hr.resize(sr.size, Image.Resampling.BICUBIC)
    sr_t, hr_t = to_tensor(sr)[None].to(device), to_tensor(hr)[None].to(device)
    try:
        for name, metric in created.items():
            value = metric(sr_t, hr_t) if metric.metric_mode == "FR" else metric(sr_t)
            row[name] = float(value.item())
    except Exception as err:  # noqa: BLE001 - one pair's failure is reported with the pair, not fatal
        return {"status": "failed", "note": f"{type(err).__name__}: {err}"}
    return {**row, "status": "scored"}


def _folder_score(metric, sr_files, hr_files, stems) -> float | None:
    """FID over the scored pairs only (upscale's chain pictures and unpaired files stay out), through two
    temporary folders of links."""
    if len(stems) < 2:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for side, files in (("sr", sr_files), ("hr", hr_files)):
            os.mkdir(Path(tmp, side))
            for stem in stems:
                os.symlink(files[stem].resolve(), Path(tmp, side, files[stem].name))
        return float(metric(str(Path(tmp, "sr")), str(Path(tmp, "hr"))))


def write_per_image_csv(result: dict, path: Path) -> Path:
    names = list(result["mean"]) or [n for n, m in result["metrics"].items() if m["pyiqa"] not in FOLDER_METRICS]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["name", "status", *names, "sr", "hr", "note"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["per_image"])
    return path


def evaluate_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlcot-grpo evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sr-dir", required=True, type=Path, help="Folder of upscaled images (upscale's --out).")
    parser.add_argument("--hr-dir", required=True, type=Path, help="Folder of HR references, same file stems.")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=["psnr", "ssim"],
        help="pyiqa names (psnr = RGB, psnry = Y of YIQ, ...), the paper's names pinned to one variant each "
        f"({', '.join(PAPER_METRICS)}), or 'paper' for its whole table. Default: psnr ssim.",
    )
    parser.add_argument("--out", type=Path, help="Write the summary and per-image scores as JSON here, and a CSV.")
    parser.add_argument("--resize-hr", action="store_true", help="Score pairs of another size on the HR resized.")
    parser.add_argument("--strict", action="store_true", help="Exit 1 unless every pair was scored.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    result = evaluate_folders(
        args.sr_dir, args.hr_dir, args.metrics, args.device, args.resize_hr, progress=not args.no_progress
    )
    counts = result["counts"]
    print(f"scored {counts['scored']} of {result['pairs']} pairs")
    for name, value in result["mean"].items():
        variant = result["metrics"][name]
        print(f"{name:>14}: {value:.4f}  (pyiqa {variant['pyiqa']} {variant['options'] or ''})")
    for name, value in result["folder"].items():
        print(f"{name:>14}: {'n/a (fewer than 2 pairs)' if value is None else f'{value:.4f}'}  (folder vs folder)")
    for row in result["per_image"]:
        if row["status"] != "scored" or row["note"]:
            print(f"  {row['status']}: {row['name']} {row['note']}".rstrip())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        csv_path = write_per_image_csv(result, args.out.with_suffix(".csv"))
        print(f"wrote {args.out} and {csv_path}")
    if not counts["scored"]:
        print("evaluate: error: no pair could be scored")
        return 1
    return 1 if args.strict and counts["scored"] < result["pairs"] else 0
