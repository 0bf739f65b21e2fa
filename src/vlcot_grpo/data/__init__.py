"""Data pipeline: Real-ESRGAN degradation with recorded parameters, degradation levels and text, VLCoT datasets.

* :mod:`~vlcot_grpo.data.degradations` - degradation ops, the parameter sampler and the deterministic applier;
* :mod:`~vlcot_grpo.data.levels` - per-step light / medium / heavy levels, their text and its parser;
* :mod:`~vlcot_grpo.data.dataset` - the dataset builder (folder or ``datasets.Dataset`` in, VLCoT columns out);
* :mod:`~vlcot_grpo.data.relabel` - recomputing the levels of datasets labelled by an older version;
* :mod:`~vlcot_grpo.data.demo` - the bundled demo photos;
* :mod:`~vlcot_grpo.data.cli` - ``vlcot-grpo prepare-data``.

The names below are imported on first use, so ``import vlcot_grpo.data.degradations`` (e.g. in a worker process)
does not pull in ``datasets`` or torch.
"""

from importlib import import_module

_EXPORTS = {
    "vlcot_grpo.data.degradations": (
        "DegradationConfig",
        "DegradationRecord",
        "FinalRecord",
        "KernelParams",
        "NoiseParams",
        "ResizeParams",
        "StageConfig",
        "StageRecord",
        "UsmParams",
        "add_gaussian_noise",
        "add_poisson_noise",
        "apply_degradation",
        "apply_degradation_with_residual_noise",
        "as_float_rgb",
        "blur",
        "degrade",
        "gaussian_kernel",
        "generalized_gaussian_kernel",
        "jpeg_compress",
        "jpeg_encode",
        "make_kernel",
        "plateau_kernel",
        "resize",
        "sample_degradation",
        "sinc_kernel",
        "to_rgb8",
        "usm_sharpen",
        "without_noise",
    ),
    "vlcot_grpo.data.levels": (
        "LABEL_VERSION",
        "LEVELS",
        "STEPS",
        "LevelThresholds",
        "ParsedLevels",
        "blur_width",
        "degradation_measures",
        "effective_jpeg_quality",
        "label_columns",
        "levels_from_measures",
        "noise_estimate",
        "residual_noise",
        "levels_agreement",
        "levels_from_record",
        "levels_to_text",
        "parse_degradation_text",
    ),
    "vlcot_grpo.data.dataset": (
        "BadImageError",
        "BuildSummary",
        "DatasetOptions",
        "SkippedFile",
        "build_vlcot_dataset",
        "build_vlcot_dataset_with_summary",
        "dataset_features",
        "default_cache_dir",
        "image_seed",
        "read_rgb_image",
    ),
    "vlcot_grpo.data.relabel": ("LabelVersionWarning", "label_versions", "upgrade_labels"),
    "vlcot_grpo.data.demo": ("build_demo_dataset", "demo_annotations", "load_demo_image"),
    "vlcot_grpo.data.cli": ("add_prepare_data_arguments", "run_prepare_data"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'vlcot_grpo.data' has no attribute {name!r}")


__all__ = sorted(_MODULE_OF)
