"""The embedded default, end to end on a CPU, offline: tiny Emu3 → cold-start SFT → GRPO on the demo photos, then
both models on the held-out photos (same seeds, the run's rewards): before → after.

``make demo`` / ``vlcot-grpo demo`` / ``python -m vlcot_grpo.demo``. Extra arguments go to the GRPO recipe.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "tiny-emu3"


def _recipe(kind: str) -> Path:
    path = RECIPES / kind / "config_demo.yaml"
    if not path.exists():
        raise FileNotFoundError(f"demo recipe {path} not found: run the demo from a checkout of the repository")
    return path


#: beside the GRPO output: the demo photos' LR inputs and HR references, for the README's upscale/evaluate commands
DEMO_LR, DEMO_HR = "demo_lr", "demo_hr"
#: beside the GRPO output: held-out pictures (``cold_start/``, ``grpo/``) and ``heldout.json``
HELDOUT = "heldout"


def save_demo_photos(grpo_dir: str | Path) -> tuple[Path, Path]:
    """Write the demo dataset's LR and HR images (as the run's vlcot_settings.json says it was built: HR size and
    degradation seed) as PNG files into ``demo_lr/`` and ``demo_hr/`` beside ``grpo_dir``; returns the two."""
    from vlcot_grpo.data.demo import build_demo_dataset
    from vlcot_grpo.saved_settings import read_settings

    data = read_settings(grpo_dir).get("dataset", {})
    rows = build_demo_dataset(hr_size=data.get("hr_size", 64), seed=data.get("seed", 0))
    folders = Path(grpo_dir).parent / DEMO_LR, Path(grpo_dir).parent / DEMO_HR
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = Path(row["source"]).stem
        row["lr_image"].save(folders[0] / f"{name}.png")
        row["hr_image"].save(folders[1] / f"{name}.png")
    return folders


def evaluate_on_heldout(cold_start: Path, grpo_dir: Path, samples: int = 4, seed: int = 0) -> Path:
    """Chains of the cold-start model and of the GRPO model on the held-out photos (never trained on), with the
    same seed and the GRPO run's rewards, sizes, prompt and sampling; prints per reward before → after and saves a
    picture per photo and model under ``heldout/`` beside ``grpo_dir``."""
    from vlcot_grpo import heldout
    from vlcot_grpo.loading import load_pretrained
    from vlcot_grpo.saved_settings import read_settings

    settings = read_settings(grpo_dir)
    rows = heldout.heldout_rows(settings)
    rewards = heldout.run_rewards(settings)
    folder = Path(grpo_dir).parent / HELDOUT
    results = {}
    for label, path in (("cold_start", cold_start), ("grpo", grpo_dir)):
        model, tokenizer = load_pretrained(str(path), dtype="float32")  # an adapter is merged into its base
        results[label] = heldout.evaluate_heldout(model, tokenizer, rows, settings, samples, seed, rewards)
        heldout.save_heldout_pictures(results[label], folder / label)
    names = ", ".join(sorted({r["source"] for r in rows}))
    print(f"[demo] held-out photos ({names}), {samples} chains each, seed {seed}: mean raw reward, cold start → GRPO")
    for line in heldout.comparison_lines(results["cold_start"], results["grpo"]):
        print(f"[demo]   {line}")
    heldout.write_summary(folder / "heldout.json", results, {"samples_per_photo": samples, "seed": seed})
    return folder


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="vlcot-grpo demo",
        allow_abbrev=False,  # --max_steps etc. pass through to the GRPO recipe whole
        description="The embedded default, offline on a CPU: the tiny Emu3 (recipes/tiny-emu3), its cold-start SFT, "
        "then GRPO with LoRA on the bundled photos; everything lands under outputs/tiny-emu3/. Any other argument "
        "(e.g. --max_steps 4) overrides the GRPO recipe.",
    )
    parser.add_argument(
        "--heldout-samples", type=int, default=4, help="Chains per held-out photo and model (default 4)."
    )
    parser.add_argument("--heldout-seed", type=int, default=0, help="Seed of the held-out chains (both models).")
    known, argv = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    from vlcot_grpo import sft

    policy = Path(sft.main(["--config", str(_recipe("sft"))]))  # a full model, also after a LoRA cold start
    print(f"[demo] cold start done in {time.perf_counter() - start:.0f} s: {policy}")

    from vlcot_grpo import grpo

    out = grpo.main(["--config", str(_recipe("grpo")), "--model_name_or_path", str(policy), *argv])
    lr_dir, hr_dir = save_demo_photos(out)
    heldout_dir = evaluate_on_heldout(policy, out, known.heldout_samples, known.heldout_seed)
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s")
    print(f"[demo] LoRA adapter:    {out}")
    print(f"[demo] reward plot:     {out / 'rewards.png'}")
    print(f"[demo] sample pictures: {out / 'samples'}")
    print(f"[demo] LR / HR photos:  {lr_dir} / {hr_dir} (README: upscale and evaluate on them)")
    print(f"[demo] held-out:        {heldout_dir} (cold_start/ and grpo/ pictures, heldout.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
