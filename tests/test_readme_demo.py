"""The README's commands after `make demo`, run as written (through the `vlcot-grpo` CLI and Python) on the demo's
outputs: upscale the demo LR photos with the GRPO adapter, evaluate against the demo HR photos, load the adapter."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from vlcot_grpo.cli import main as cli
from vlcot_grpo.demo import DEMO_HR, DEMO_LR, save_demo_photos

ROOT = Path(__file__).resolve().parents[1]


def readme_demo_blocks() -> tuple[list[list[str]], str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("`make demo` leaves") : readme.index("## Training a real model")]
    bash = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    commands = [shlex.split(line) for line in bash.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["vlcot-grpo", "upscale"], ["vlcot-grpo", "evaluate"]], commands
    return [c[1:] for c in commands], re.search(r"```python\n(.*?)```", section, re.S)[1]


def _run_readme(tmp_path, capsys, expect_scored: bool):
    commands, snippet = readme_demo_blocks()
    for argv in commands:
        code = cli(argv)
        printed = capsys.readouterr().out
        if argv[0] == "evaluate" and not expect_scored and "no pair could be scored" in printed:
            assert code == 1  # honest: the 1-step model wrote no complete chain
            continue
        assert code == 0, (argv, printed)
    namespace = {}
    exec(snippet, namespace)
    assert type(namespace["model"]).__name__ == "Emu3ForConditionalGeneration"
    records = list((tmp_path / "outputs/tiny-emu3/sr").glob("*.json"))
    assert len(records) == len(list((tmp_path / "outputs/tiny-emu3" / DEMO_LR).iterdir())) == 7


def test_readme_demo_commands_on_a_one_step_demo(tmp_path, monkeypatch, capsys):
    """The demo's GRPO recipe with its own paths (outputs/tiny-emu3/...), 1 step at tiny sizes and no cold start."""
    from vlcot_grpo import grpo

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    out = grpo.main([
        "--config", str(ROOT / "recipes/tiny-emu3/grpo/config_demo.yaml"), "--max_completion_length", "96",
        "--num_generations", "2", "--lr_size", "16", "--rough_size", "4", "--middle_size", "8", "--final_size", "16",
        "--demo_hr_size", "16", "--per_device_train_batch_size", "2", "--report_to", "none", "--image_log_steps", "0",
        "--tiny_model_spec", "{}", "--max_steps", "1", "--save_strategy", "no",
    ])  # fmt: skip
    lr_dir, hr_dir = save_demo_photos(out)
    assert (lr_dir.name, hr_dir.name) == (DEMO_LR, DEMO_HR) and len(list(hr_dir.iterdir())) == 7
    _run_readme(tmp_path, capsys, expect_scored=False)


@pytest.mark.slow
def test_readme_demo_commands_after_the_real_demo(tmp_path, monkeypatch, capsys):
    """`make demo` itself (fewer GRPO steps), then the README's commands: complete chains, scored pairs."""
    from vlcot_grpo import demo

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--max_steps", "2"]) == 0
    _run_readme(tmp_path, capsys, expect_scored=True)
    scores = json.loads((tmp_path / "outputs/tiny-emu3/scores.json").read_text())
    assert scores["counts"]["scored"] >= 1 and set(scores["mean"]) == {"PSNR", "SSIM"}
