"""Milliseconds per 512x512 HR image for the whole degradation pipeline (sample + apply) on one CPU core.

    python benchmarks/degradation.py [--images 50] [--size 512] [--scale 4]

Uses real photos bundled with scikit-image / matplotlib (the demo images), centre-cropped to the HR size, and a
different seed per image, so all branches of the pipeline (Poisson / Gaussian noise, up / down resizing, sinc,
both final orders) are exercised. Target: <= 60 ms mean per 512x512 image.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np
import torch

from vlcot_grpo.data.dataset import prepare_hr
from vlcot_grpo.data.degradations import apply_degradation, sample_degradation
from vlcot_grpo.data.demo import demo_annotations, load_demo_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50, help="Images to time (default: 50).")
    parser.add_argument("--size", type=int, default=512, help="HR side (default: 512).")
    parser.add_argument("--scale", type=int, default=4, help="SR scale (default: 4).")
    args = parser.parse_args()

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

    apply_degradation(photos[0], sample_degradation(None, 0, args.size, args.scale))  # warm-up (tables, caches)
    timings_ms = []
    for index in range(args.images):
        hr = photos[index % len(photos)]
        start = time.perf_counter()
        record = sample_degradation(None, 1000 + index, args.size, args.scale)
        apply_degradation(hr, record)
        timings_ms.append((time.perf_counter() - start) * 1000)

    timings_ms.sort()
    p90 = timings_ms[min(len(timings_ms) - 1, int(round(0.9 * len(timings_ms))) - 1)]
    print(
        f"degradation pipeline, {args.size}x{args.size} HR -> x{args.scale} LR, 1 CPU thread, "
        f"{len(timings_ms)} images ({len(photos)} distinct photos):\n"
        f"  mean {statistics.fmean(timings_ms):.1f} ms   median {statistics.median(timings_ms):.1f} ms   "
        f"p90 {p90:.1f} ms   max {timings_ms[-1]:.1f} ms   (target: mean <= 60 ms)"
    )


if __name__ == "__main__":
    main()
