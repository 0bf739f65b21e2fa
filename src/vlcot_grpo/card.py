"""The model card written next to a trained model or adapter (``README.md``), through the Hub library's
``ModelCard``: what was trained from what, with which recipe, rewards and data, its final metrics, a loading snippet
that works, and the RealSR-R1 citation. Both trainers use it in place of TRL's stock card (``create_model_card``)."""

from __future__ import annotations

import json
from pathlib import Path

CITATION = """@misc{realsr_r1_2025,
  title         = {RealSR-R1: Reinforcement Learning for Real-World Image Super-Resolution with Vision-Language
                   Chain-of-Thought},
  year          = {2025},
  eprint        = {2506.16796},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2506.16796}
}"""

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ what }} trained with vlcot-grpo ({{ method_long }}): a unified vision-language model that
reads a low-quality image and writes a Vision-Language Chain of Thought (degradation, then rough, middle and final
descriptions and images) whose final image is the super-resolved output (RealSR-R1, arXiv 2506.16796).

| | |
|---|---|
| base model | {{ base }} |
| family | {{ family }} (`{{ model_class }}`) |
| LR input / stage sizes | {{ sizes }} |
| dataset | {{ dataset }} |

## Load it

```python
{{ snippet }}
```

Or from the command line (sizes, prompt and sampling come from `vlcot_settings.json` in this folder):

```bash
vlcot-grpo upscale --model {{ location }} --input lr_photos/ --out sr/
```
{% if rewards %}
## Rewards

| reward | weight | arguments |
|---|---|---|
{% for r in rewards %}| {{ r.name }} | {{ r.weight }} | {{ r.kwargs }} |
{% endfor %}{% endif %}
## Training

| setting | value |
|---|---|
{% for k, v in training %}| {{ k }} | {{ v }} |
{% endfor %}
{% if metrics %}
## Final metrics

| metric | value |
|---|---|
{% for k, v in metrics %}| {{ k }} | {{ v }} |
{% endfor %}{% endif %}
{% if recipe %}
## Recipe

`{{ recipe_file }}`{% if overrides %}, with `{{ overrides }}` on the command line{% endif %}:

```yaml
{{ recipe }}
```
{% endif %}
## Citation

```bibtex
{{ citation }}
```
"""


def _snippet(settings: dict, location: str) -> str:
    if settings.get("adapter"):
        base = settings["base_model"].get("hub_id") or settings["base_model"]["path"]
        return (
            "import vlcot_grpo\n\n"
            f"model, tokenizer = vlcot_grpo.load_pretrained({location!r})  # base: {base}, adapter merged\n\n"
            "# or with plain PEFT, on the family's class (AutoModelForCausalLM would load a text-only model):\n"
            "from peft import PeftModel\n"
            f"from {settings.get('model_module') or 'transformers'} import {settings['model_class']}\n\n"
            f"base = {settings['model_class']}.from_pretrained({base!r})\n"
            f"model = PeftModel.from_pretrained(base, {location!r})"
        )
    return (
        "import vlcot_grpo\n\n"
        f"model, tokenizer = vlcot_grpo.load_pretrained({location!r})\n\n"
        "# or with the family's class alone:\n"
        f"from {settings.get('model_module') or 'transformers'} import {settings['model_class']}\n\n"
        f"model = {settings['model_class']}.from_pretrained({location!r})"
    )


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def build_model_card(settings: dict, metrics=None, hub_model_id: str | None = None, folder: str | Path | None = None):
    """A ``huggingface_hub.ModelCard`` from a run's saved settings (``saved_settings.training_settings``); its
    snippets load from ``hub_model_id`` when the card is pushed, else from ``folder``."""
    from huggingface_hub import ModelCard, ModelCardData

    base = settings["base_model"]
    base_id = base.get("hub_id")
    adapter = settings.get("adapter")
    location = hub_model_id or (str(Path(folder).resolve()) if folder else "path/to/this/folder")
    dataset = settings.get("dataset", {})
    data_text = dataset.get("name", "?")
    if dataset.get("prepare_data"):
        kept = ("hr_size", "scale", "lr_size", "seed", "degradation_config")
        data_text += " (prepare-data: " + ", ".join(f"{k}={dataset['prepare_data'].get(k)}" for k in kept) + ")"
    elif data_text == "demo":
        data_text += f" (bundled photos, HR {dataset.get('hr_size')} px, degradation seed {dataset.get('seed')})"
    sizes = settings["stage_sizes"]
    card_data = ModelCardData(
        base_model=base_id,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-to-image",
        tags=["vlcot-grpo", settings["method"], "super-resolution", "image-to-image", settings["family"]],
    )
    recipe = settings.get("recipe") or {}
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        name=hub_model_id or f"VLCoT {settings['method'].upper()} {'adapter' if adapter else 'model'}",
        what="A LoRA adapter" if adapter else "A model",
        method_long="GRPO with VLCoT rollouts" if settings["method"] == "grpo" else "cold-start SFT on VLCoT traces",
        base=f"`{base_id}` (trained from `{base['path']}`)" if base_id else f"`{base['path']}` (local; no Hub id set)",
        family=settings["family"],
        model_class=settings["model_class"],
        sizes=f"{settings['lr_size']} px / "
        + " / ".join(f"{s} {sizes[s][0]}x{sizes[s][1]}" for s in ("rough", "middle", "final")),
        dataset=data_text,
        snippet=_snippet(settings, location),
        location=location,
        rewards=[{**r, "kwargs": _fmt(r["kwargs"]) if r["kwargs"] else ""} for r in settings.get("rewards", [])],
        training=[(k, _fmt(v)) for k, v in settings.get("training", {}).items() if v is not None],
        metrics=[(k, _fmt(v)) for k, v in (metrics or {}).items() if not k.endswith(("/std", "/nan_count"))],
        recipe=(recipe.get("text") or "").strip(),
        recipe_file=recipe.get("file"),
        overrides=" ".join(recipe.get("overrides") or []),
        citation=CITATION,
    )


def write_model_card(folder: str | Path, settings: dict, metrics: dict | None = None, hub_model_id=None) -> Path:
    path = Path(folder) / "README.md"
    build_model_card(settings, metrics, hub_model_id, folder).save(path)
    return path


class ModelCardMixin:
    """Replaces TRL's stock card (``create_model_card``, called at each checkpoint and by ``push_to_hub``) with this
    module's, once the script has set ``vlcot_settings`` (``script_utils.record_run``)."""

    vlcot_settings: dict | None = None

    def card_hub_id(self) -> str | None:
        return getattr(self, "hub_model_id", None) if self.args.push_to_hub else None

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        if self.vlcot_settings is None:  # a trainer built by hand, not by the scripts: TRL's card
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return None
        from vlcot_grpo.saved_settings import final_metrics

        metrics = final_metrics(self.state.log_history)
        return write_model_card(self.args.output_dir, self.vlcot_settings, metrics, self.card_hub_id())
