import os

# Tests never touch the network: set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny Emu3 checkpoint on disk, as a user's real checkpoint would be."""
    from vlcot_grpo.models.tiny import save_tiny_emu3

    return save_tiny_emu3(tmp_path_factory.mktemp("tiny-emu3"))


class Tiny(tuple):
    """(model, tokenizer, backend) of one tiny family, with the family's name and test sizes (pixels): ``sizes``
    (stage -> (h, w)), ``grids`` (stage -> code grid) and ``lr`` (the prompt image's (h, w))."""

    def __new__(cls, model, tokenizer, backend, family):
        obj = super().__new__(cls, (model, tokenizer, backend))
        obj.family = family
        obj.sizes, obj.lr = FAMILY_SIZES[family]
        obj.grids = {s: backend.grid_for(*hw) for s, hw in obj.sizes.items()}
        return obj


#: Stage sizes and LR size the backend-generic tests use per family: Emu3 and Janus at downsample 4; PURE in its
#: 32-pixel units at downsample 8 (24, 76 and 160 tokens per image).
FAMILY_SIZES = {
    "emu3": ({"rough": (8, 8), "middle": (16, 16), "final": (32, 32)}, (16, 16)),
    "pure": ({"rough": (32, 32), "middle": (64, 64), "final": (96, 96)}, (32, 32)),
    "janus": ({"rough": (8, 8), "middle": (16, 16), "final": (32, 32)}, (32, 32)),
}
FAMILIES = tuple(FAMILY_SIZES)


def _load_tiny(path, family):
    from transformers import AutoTokenizer

    from vlcot_grpo.models import load_backend, load_model

    model = load_model(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Tiny(model, tokenizer, load_backend(model, tokenizer), family)


@pytest.fixture(scope="session")
def tiny_emu3(tiny_path):
    """The tiny Emu3 (model, tokenizer, backend), loaded from disk through from_pretrained; also where a module
    runs its tests on each family under the name ``tiny``."""
    return _load_tiny(tiny_path, "emu3")


@pytest.fixture(scope="session")
def tiny(tiny_emu3):
    """The tiny Emu3, by its usual name."""
    return tiny_emu3


@pytest.fixture(scope="session")
def tiny_pure_path(tmp_path_factory):
    """A tiny PURE checkpoint (Chameleon + LlamaGen VQ-8 shape) on disk."""
    from vlcot_grpo.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-pure"), "pure")


@pytest.fixture(scope="session")
def tiny_pure(tiny_pure_path):
    return _load_tiny(tiny_pure_path, "pure")


@pytest.fixture(scope="session")
def tiny_janus_path(tmp_path_factory):
    """A tiny Janus checkpoint (image codes on their own table and head) on disk."""
    from vlcot_grpo.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-janus"), "janus")


@pytest.fixture(scope="session")
def tiny_janus(tiny_janus_path):
    return _load_tiny(tiny_janus_path, "janus")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_family(request):
    """Each family's tiny model in turn: backend-generic tests take this (or alias ``tiny`` to it)."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def photo():
    """A real photograph bundled with scikit-image (public domain)."""
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.astronaut())


def _benchmark_module(name: str):
    """benchmarks/<name>.py as a module; benchmarks/ is not a package."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:  # benchmarks/rollout.py imports its presets module by name
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench():
    """benchmarks/rollout.py as a module: its sections and ``main``."""
    return _benchmark_module("rollout")


@pytest.fixture(scope="session")
def presets():
    """benchmarks/presets.py: the benchmark's model presets, prompts and chain hooks."""
    return _benchmark_module("presets")


@pytest.fixture(scope="session")
def lookalike_path(tmp_path_factory):
    """A tiny Emu3 saved the way BAAI/Emu3-Gen-hf is published: no VLCoT tags (vlcot_grpo.models.lookalike)."""
    from vlcot_grpo.models.lookalike import save_emu3_lookalike

    return save_emu3_lookalike(tmp_path_factory.mktemp("emu3-lookalike"))


@pytest.fixture(scope="session")
def prepared_path(lookalike_path, tmp_path_factory):
    """The look-alike after `vlcot-grpo prepare` (its reserved tokens re-purposed as the tags)."""
    from vlcot_grpo.models import prepare_checkpoint

    out = tmp_path_factory.mktemp("emu3-lookalike-prepared") / "model"
    prepare_checkpoint(lookalike_path, out)
    return out


@pytest.fixture(scope="session")
def pure_prepared_path(tmp_path_factory):
    """A tiny PURE saved as published, converted (`vlcot-grpo convert`) and prepared (`vlcot-grpo prepare`)."""
    from vlcot_grpo.models import prepare_checkpoint
    from vlcot_grpo.models.convert import convert_checkpoint
    from vlcot_grpo.models.lookalike import save_pure_lookalike

    root = tmp_path_factory.mktemp("pure-published")
    save_pure_lookalike(root)
    converted = convert_checkpoint(root / "model", root / "vq_ds8_c2i.pt", root / "converted")
    prepare_checkpoint(converted, root / "prepared")
    return root / "prepared"


@pytest.fixture(scope="session")
def janus_prepared_path(tmp_path_factory):
    """A tiny Janus saved as Janus-Pro is published, then prepared (`vlcot-grpo prepare`)."""
    from vlcot_grpo.models import prepare_checkpoint
    from vlcot_grpo.models.lookalike import save_janus_lookalike

    root = tmp_path_factory.mktemp("janus-published")
    save_janus_lookalike(root / "published")
    prepare_checkpoint(root / "published", root / "prepared")
    return root / "prepared"


GRPO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-emu3" / "grpo" / "config_demo.yaml"


def _train_tiny_grpo(*extra):
    """One GRPO LoRA step of the demo recipe at tiny sizes, with the relative paths model/ and out/ (from the
    current folder): what `vlcot-grpo grpo` leaves a user."""
    from vlcot_grpo import grpo

    return grpo.main([
        "--config", str(GRPO_RECIPE), "--model_name_or_path", "model", "--output_dir", "out",
        "--max_completion_length", "96", "--num_generations", "2", "--lr_size", "16", "--rough_size", "4",
        "--middle_size", "8", "--final_size", "16", "--per_device_train_batch_size", "2", "--report_to", "none",
        "--image_log_steps", "0", "--tiny_model_spec", "{}", "--max_steps", "1", "--save_strategy", "no", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="session")
def grpo_adapter(tmp_path_factory):
    """The folder of a 1-step GRPO LoRA run (train_tiny_grpo): model/ is the base, out/ the adapter."""
    root = tmp_path_factory.mktemp("grpo-run")
    here = os.getcwd()
    os.chdir(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_tiny_grpo()
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def train_tiny_grpo():
    """_train_tiny_grpo, for a test that trains again with other arguments (from its current folder)."""
    return _train_tiny_grpo
