"""The embedded default, end to end on a CPU, offline: tiny Emu3 → cold-start SFT → GRPO on the demo photos.

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


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="vlcot-grpo demo",
        allow_abbrev=False,  # --max_steps etc. pass through to the GRPO recipe whole
        description="The embedded default, offline on a CPU: the tiny Emu3 (recipes/tiny-emu3), its cold-start SFT, "
        "then GRPO with LoRA on the bundled photos; everything lands under outputs/tiny-emu3/. Any other argument "
        "(e.g. --max_steps 4) overrides the GRPO recipe.",
    )
    argv = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))[1]
    start = time.perf_counter()
    from vlcot_grpo import sft

    policy = Path(sft.main(["--config", str(_recipe("sft"))]))  # a full model, also after a LoRA cold start
    print(f"[demo] cold start done in {time.perf_counter() - start:.0f} s: {policy}")

    from vlcot_grpo import grpo

    out = grpo.main(["--config", str(_recipe("grpo")), "--model_name_or_path", str(policy), *argv])
    lr_dir, hr_dir = save_demo_photos(out)
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s")
    print(f"[demo] LoRA adapter:    {out}")
    print(f"[demo] reward plot:     {out / 'rewards.png'}")
    print(f"[demo] sample pictures: {out / 'samples'}")
    print(f"[demo] LR / HR photos:  {lr_dir} / {hr_dir} (README: upscale and evaluate on them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
