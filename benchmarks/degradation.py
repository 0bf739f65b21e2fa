"""Milliseconds per 512x512 HR image for the whole degradation pipeline (sample + apply) on one CPU core.

    python benchmarks/degradation.py [--images 50] [--size 512] [--scale 4] [--no-usm]

Uses real photos bundled with scikit-image / matplotlib (the demo images), centre-cropped to the HR size, and a
different seed per image, so all branches of the pipeline (Poisson / Gaussian noise, up / down resizing, sinc,
both final orders) are exercised. Target: <= 60 ms mean per 512x512 image.

Wall-clock time is the number that matters; the process CPU time is printed next to it because on a busy
machine (other processes competing for the core) wall-clock time also counts the waiting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch

from vlcot_grpo.data.dataset import prepare_hr
from vlcot_grpo.data.degradations import DegradationConfig, apply_degradation, sample_degradation
from vlcot_grpo.data.demo import demo_annotations, load_demo_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50, help="Images to time (default: 50).")
    parser.add_argument("--size", type=int, default=512, help="HR side (default: 512).")
    parser.add_argument("--scale", type=int, default=4, help="SR scale (default: 4).")
    parser.add_argument("--no-usm", action="store_true", help="gt_usm off: degrade the plain HR.")
    args = parser.parse_args()
    config = DegradationConfig(gt_usm=not args.no_usm)

    # One core: the budget is per core, and a data loader runs one image per worker process.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    photos = []
    for entry in demo_annotations():
        image = load_demo_image(entry["name"])
        if min(image.size) >= args.size:
            photos.append(np.asarray(prepare_hr(image, args.size, entry["name"])))
    if not photos:
        raise SystemExit(f"no demo photo is at least {args.size} px on its short side")

    apply_degradation(photos[0], sample_degradation(config, 0, args.size, args.scale))  # warm-up (tables, caches)
    wall_ms, cpu_ms = [], []
    for index in range(args.images):
        hr = photos[index % len(photos)]
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        record = sample_degradation(config, 1000 + index, args.size, args.scale)
        apply_degradation(hr, record)
        wall_ms.append((time.perf_counter() - wall_start) * 1000)
        cpu_ms.append((time.process_time() - cpu_start) * 1000)

    print(
        f"degradation pipeline (sample + apply), {args.size}x{args.size} HR -> x{args.scale} LR, 1 CPU thread, "
        f"{len(wall_ms)} images ({len(photos)} distinct photos), gt_usm {'off' if args.no_usm else 'on'}; "
        "target: mean <= 60 ms"
    )
    for name, timings in (("wall-clock", wall_ms), ("CPU time", cpu_ms)):
        timings = sorted(timings)
        p90 = timings[min(len(timings) - 1, round(0.9 * len(timings)) - 1)]
        print(
            f"  {name:>10}: mean {statistics.fmean(timings):5.1f} ms   median {statistics.median(timings):5.1f} ms   "
            f"p90 {p90:5.1f} ms   max {timings[-1]:5.1f} ms"
        )


if __name__ == "__main__":
    main()
