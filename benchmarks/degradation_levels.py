"""Do the degradation labels say what the LR image shows? Distribution of every level measure, its tertiles, and
the agreement of the labels (label version 1 and the current one) with image-side measures.

    python benchmarks/degradation_levels.py [--draws 2000] [--size 512] [--scale 4] [--no-usm] [--json out.json]
    python benchmarks/degradation_levels.py --summarise out.json   # the report again, with the current thresholds

Draws ``--draws`` default records (seeds 0, 1, ...; Real-ESRGAN x4plus ranges) for ``--size``² HR crops of the
bundled demo photos (photo ``i % n`` for seed ``i``) and measures, per record:

* the image-side measures the labels should follow:
  - blur: the effective blur width of the kernels actually applied (``levels.blur_width``: second moment of each
    truncated kernel, sinc by its half-amplitude frequency, stages added as variances in HR pixels);
  - noise: the residual noise, std of the LR minus the LR replayed with the noise draws zeroed (``levels.
    residual_noise``, 0-255 units at the LR size);
  - compression: the JPEG error left in the LR relative to its detail (:func:`jpeg_error`): std of the noise-free
    LR minus the noise-free LR replayed with every JPEG left out, over the std of the JPEG-free LR's fine detail;
* the label measures: label version 1 (the formulas before, frozen in :func:`v1_measures`) and the current
  ``levels.degradation_measures`` (and, for noise, the record-only ``levels.noise_estimate``).

It prints the distribution table (tertiles, the share of each level under the current thresholds), Spearman
correlations and bucket disagreement (the label's level vs the image-side measure split at its own tertiles), and
the JPEG attenuation exponents tried for ``levels.effective_jpeg_quality``. One CPU thread; about 0.2 s per draw
at 512².
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from unittest import mock

import cv2
import numpy as np
import torch
from scipy.stats import spearmanr

from vlcot_grpo.data import degradations as deg
from vlcot_grpo.data import levels as lv
from vlcot_grpo.data.dataset import prepare_hr
from vlcot_grpo.data.demo import demo_annotations, load_demo_image

STEPS = lv.STEPS
#: Label version 1's bucket boundaries (light_below, heavy_from); compression: (light_at_or_above, heavy_below).
V1_THRESHOLDS = {
    "blur": (1.5, 2.5),
    "downsample": (5.0, 8.0),
    "noise": (12.0, 20.0),
    "compression": (75.0, 50.0),
    "upsample": (1.25, 2.0),
}


# ----------------------------------------------------------------------------------------------------------------
# Label version 1, frozen: the measures as they were computed before label version 2
# ----------------------------------------------------------------------------------------------------------------


def v1_kernel_sigma(kernel: deg.KernelParams) -> float:
    if kernel.kind == "sinc":
        return math.sqrt(2.0 * math.log(2.0)) / float(kernel.cutoff)
    sigma_x = float(kernel.sigma_x)
    sigma_y = float(kernel.sigma_y if kernel.sigma_y is not None else sigma_x)
    return math.sqrt((sigma_x**2 + sigma_y**2) / 2.0)


def v1_noise_sigma(noise: deg.NoiseParams) -> float:
    if noise.kind == "gaussian":
        return float(noise.sigma)
    return float(noise.scale) * 255.0 * math.sqrt(0.5 / 256.0)


def v1_measures(record: deg.DegradationRecord) -> dict[str, float | None]:
    hr_width, lr_width = record.hr_size[1], record.lr_size[1]
    first_width = record.first_stage.resize.out_size[1]
    second_width = record.second_stage.resize.out_size[1]
    variance, blurred = 0.0, False
    if record.first_stage.blur is not None:
        variance += v1_kernel_sigma(record.first_stage.blur) ** 2
        blurred = True
    if record.second_stage.blur is not None:
        variance += (v1_kernel_sigma(record.second_stage.blur) * hr_width / first_width) ** 2
        blurred = True
    downsample = hr_width / min(hr_width, first_width, second_width, lr_width)
    first_noise = v1_noise_sigma(record.first_stage.noise) * min(1.0, lr_width / first_width)
    second_noise = v1_noise_sigma(record.second_stage.noise) * min(1.0, lr_width / second_width)
    upsample = max(first_width / hr_width, second_width / first_width, lr_width / second_width)
    return {
        "blur": math.sqrt(variance) if blurred else None,
        "downsample": downsample if downsample > 1.0 else None,
        "noise": math.hypot(first_noise, second_noise),
        "compression": float(record.final.jpeg_quality),
        "upsample": upsample if upsample > 1.0 else None,
    }


def v1_level(step: str, value: float | None) -> str | None:
    if value is None:
        return None
    low, high = V1_THRESHOLDS[step]
    if step == "compression":
        return "heavy" if value < high else "medium" if value < low else "light"
    return "light" if value < low else "medium" if value < high else "heavy"


# ----------------------------------------------------------------------------------------------------------------
# Image-side measures
# ----------------------------------------------------------------------------------------------------------------


def jpeg_error(hr: np.ndarray, record: deg.DegradationRecord) -> float:
    """The JPEG error left in the LR relative to its detail: std of the noise-free LR minus the noise-free LR with
    every JPEG left out, over the std of that JPEG-free LR's detail (itself minus its Gaussian blur, sigma 1 LR
    pixel). Without the division the measure mostly says how detailed the photo and how blurred the LR are."""
    clean = deg.apply_degradation_array(hr, record, noise=False, at_lr_size=True).astype(np.float64)
    with mock.patch.object(deg, "jpeg_compress", lambda image, quality: image):
        unjpegged = deg.apply_degradation_array(hr, record, noise=False, at_lr_size=True).astype(np.float64)
    detail = float(np.std(unjpegged - cv2.GaussianBlur(unjpegged, (0, 0), 1.0)))
    return deg.residual_noise_std(clean, unjpegged) / max(detail, 1e-6)


def collect(draws: int, size: int, scale: int, usm: bool, photos: list[np.ndarray], progress: bool = False):
    """One dict per draw: record, image-side measures, v1 and current measures."""
    config = deg.DegradationConfig(gt_usm=usm)
    rows = []
    start = time.perf_counter()
    for seed in range(draws):
        hr = photos[seed % len(photos)]
        record = deg.sample_degradation(config, seed, size, scale)
        residual = lv.residual_noise(hr, record)
        rows.append(
            {
                "record": record,
                "image": {"blur": lv.blur_width(record), "noise": residual, "compression": jpeg_error(hr, record)},
                "v1": v1_measures(record),
                "current": lv.degradation_measures(record, noise=residual),
                "noise_estimate": lv.noise_estimate(record),
            }
        )
        if progress and (seed + 1) % 100 == 0:
            print(f"  {seed + 1}/{draws} draws, {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def tertiles(values: list[float]) -> tuple[float, float]:
    low, high = np.quantile(np.asarray(values, dtype=np.float64), [1 / 3, 2 / 3])
    return float(low), float(high)


def bucket(value: float, low: float, high: float, reverse: bool = False) -> int:
    """0 light, 1 medium, 2 heavy; ``reverse`` for measures where smaller is heavier (JPEG quality)."""
    if reverse:
        return 2 if value < high else 1 if value < low else 0
    return 0 if value < low else 1 if value < high else 2


def agreement(label_values, levels, image_values, reverse_label: bool) -> dict[str, float]:
    """Spearman of label measure vs image-side measure (sign-corrected so that higher = agree), and the share of
    draws whose label level differs from the image-side measure split at its tertiles."""
    low, high = tertiles(image_values)
    image_levels = [bucket(v, low, high) for v in image_values]
    rho = spearmanr(label_values, image_values).statistic
    return {
        "spearman": float(-rho if reverse_label else rho),
        "level_spearman": float(spearmanr(levels, image_values).statistic),
        "bucket_disagreement": float(np.mean([a != b for a, b in zip(levels, image_levels)])),
    }


LEVEL_INDEX = {"light": 0, "medium": 1, "heavy": 2}


def summarise(rows, thresholds: lv.LevelThresholds) -> dict:
    report: dict = {"draws": len(rows), "distribution": {}, "agreement": {}, "jpeg_exponents": {}}
    for step in STEPS:
        applied = [row["current"][step] for row in rows if row["current"][step] is not None]
        levels = [lv.levels_from_measures(row["current"], thresholds)[step] for row in rows]
        shares = {name: levels.count(name) / len(rows) for name in (*lv.LEVELS, None)}
        report["distribution"][step] = {
            "applied": len(applied) / len(rows),
            "tertiles": tertiles(applied) if applied else None,
            "min": min(applied) if applied else None,
            "median": float(np.median(applied)) if applied else None,
            "max": max(applied) if applied else None,
            "shares": {str(k): v for k, v in shares.items()},
        }
    for step in ("blur", "noise", "compression"):
        image = [row["image"][step] for row in rows]
        keep = [i for i, value in enumerate(image) if value is not None]
        image = [image[i] for i in keep]
        entry = {}
        for version in ("v1", "current"):
            values = [rows[i][version][step] for i in keep]
            if version == "v1":
                levels = [LEVEL_INDEX[v1_level(step, v)] for v in values]
            else:
                levels = [
                    LEVEL_INDEX[lv.levels_from_measures({step: v}, thresholds)[step]]
                    for v in values  # other steps absent: only this one is bucketed
                ]
            entry[version] = agreement(values, levels, image, reverse_label=step == "compression")
        if step == "noise":
            values = [rows[i]["noise_estimate"] for i in keep]
            levels = [LEVEL_INDEX[lv.levels_from_measures({"noise": v}, thresholds)["noise"]] for v in values]
            entry["record_only_estimate"] = agreement(values, levels, image, reverse_label=False)
        report["agreement"][step] = entry
    # Stage-1 kernels alone (the figure): v1 sigma vs the kernel's effective width, both split at (1.5, 2.5).
    kinds: dict[str, list[bool]] = {}
    for row in rows:
        kernel = row["record"].first_stage.blur
        if kernel is None:
            continue
        old = bucket(v1_kernel_sigma(kernel), 1.5, 2.5)
        new = bucket(lv.kernel_blur_sigma(kernel), 1.5, 2.5)
        kinds.setdefault(kernel.kind, []).append(old != new)
    every = [x for flags in kinds.values() for x in flags]
    report["stage1_kernel_disagreement"] = {
        "all": float(np.mean(every)),
        **{kind: float(np.mean(flags)) for kind, flags in sorted(kinds.items())},
    }
    # JPEG attenuation exponents: which one best orders the JPEG error left in the LR?
    image = [row["image"]["compression"] for row in rows]
    final_only = [float(row["record"].final.jpeg_quality) for row in rows]
    report["jpeg_exponents"]["final quality only"] = float(-spearmanr(final_only, image).statistic)
    for exponent in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0):
        with mock.patch.object(lv, "JPEG_SHRINK_EXPONENT", exponent):
            values = [lv.effective_jpeg_quality(row["record"]) for row in rows]
        report["jpeg_exponents"][f"exponent {exponent:g}"] = float(-spearmanr(values, image).statistic)
    # Upsample: v1 said "upsampled" where the current measure sees no enlargement in the LR.
    invisible = [row["v1"]["upsample"] is not None and row["current"]["upsample"] is None for row in rows]
    report["v1_upsample_invisible"] = float(np.mean(invisible))
    return report


def print_report(report: dict, thresholds: lv.LevelThresholds) -> None:
    print(f"{report['draws']} draws")
    print("\ndistribution of the current measures (applied draws) and the levels under the current thresholds")
    print(f"{'step':12s} {'applied':>7s} {'min':>7s} {'1/3':>7s} {'median':>7s} {'2/3':>7s} {'max':>7s}   shares")
    for step, entry in report["distribution"].items():
        if entry["tertiles"] is None:
            print(f"{step:12s} never applied")
            continue
        low, high = entry["tertiles"]
        shares = "  ".join(f"{k} {v:.0%}" for k, v in entry["shares"].items() if v)
        print(
            f"{step:12s} {entry['applied']:7.0%} {entry['min']:7.2f} {low:7.2f} {entry['median']:7.2f} {high:7.2f} "
            f"{entry['max']:7.2f}   {shares}"
        )
    print("\nthresholds:", dataclasses.asdict(thresholds))
    print("\nagreement with the image-side measure (Spearman of measures / of levels; bucket disagreement)")
    for step, entry in report["agreement"].items():
        for version, numbers in entry.items():
            print(
                f"  {step:12s} {version:22s} spearman {numbers['spearman']:5.2f}   levels {numbers['level_spearman']:5.2f}"
                f"   disagreement {numbers['bucket_disagreement']:5.1%}"
            )
    print("\nstage-1 kernels in another (1.5, 2.5) bucket than their effective width:")
    print("  " + ", ".join(f"{k} {v:.0%}" for k, v in report["stage1_kernel_disagreement"].items()))
    print("\nJPEG: Spearman of the compression measure vs the JPEG error left in the LR")
    for name, rho in report["jpeg_exponents"].items():
        print(f"  {name:20s} {rho:5.3f}")
    print(
        f"\nv1 upsample applied but no enlargement visible in the LR: {report['v1_upsample_invisible']:.0%} of draws"
    )


def load_photos(size: int) -> list[np.ndarray]:
    photos = []
    for entry in demo_annotations():
        image = load_demo_image(entry["name"])
        if min(image.size) >= size:
            photos.append(np.asarray(prepare_hr(image, size, entry["name"])))
    if not photos:
        raise SystemExit(f"no demo photo is at least {size} px on its short side")
    return photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000, help="Records to draw (default: 2000).")
    parser.add_argument("--size", type=int, default=512, help="HR side (default: 512).")
    parser.add_argument("--scale", type=int, default=4, help="SR scale (default: 4).")
    parser.add_argument("--no-usm", action="store_true", help="gt_usm off (how datasets before version 2 were made).")
    parser.add_argument("--json", default=None, help="Also write the draws' measures and the report to this file.")
    parser.add_argument("--summarise", default=None, help="Report on the draws of an earlier --json file.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    thresholds = lv.LevelThresholds()
    if args.summarise:
        with open(args.summarise) as handle:
            saved = json.load(handle)
        rows = [{**row, "record": deg.DegradationRecord.from_dict(row["record"])} for row in saved["rows"]]
        print(f"draws from {args.summarise}: {saved['settings']}")
    else:
        photos = load_photos(args.size)
        rows = collect(args.draws, args.size, args.scale, not args.no_usm, photos, progress=True)
    report = summarise(rows, thresholds)
    print_report(report, thresholds)
    if args.json and not args.summarise:
        settings = {"draws": args.draws, "size": args.size, "scale": args.scale, "gt_usm": not args.no_usm}
        serial = [{**row, "record": row["record"].to_dict()} for row in rows]
        with open(args.json, "w") as handle:
            json.dump({"settings": settings, "report": report, "rows": serial}, handle)


if __name__ == "__main__":
    main()
