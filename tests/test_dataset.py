"""Dataset builder, bad inputs, the prepare-data command and the demo dataset. Every input is a real file."""

import argparse
import io
import json
import logging
import re
import shutil
import warnings

import datasets
import numpy as np
import pytest
import skimage.data
from PIL import Image

from vlcot_grpo.data import dataset as dataset_module
from vlcot_grpo.data.cli import add_prepare_data_arguments, run_prepare_data
from vlcot_grpo.data.dataset import (
    BadImageError,
    DatasetOptions,
    build_vlcot_dataset,
    build_vlcot_dataset_with_summary,
    read_rgb_image,
)
from vlcot_grpo.data.degradations import DegradationConfig, DegradationRecord, apply_degradation, sample_degradation
from vlcot_grpo.data.demo import build_demo_dataset, demo_annotations
from vlcot_grpo.data.levels import (
    LABEL_VERSION,
    STEPS,
    degradation_measures,
    levels_from_measures,
    levels_to_text,
    parse_degradation_text,
    residual_noise,
)
from vlcot_grpo.data.relabel import LabelVersionWarning, label_versions, upgrade_labels
from vlcot_grpo.vlcot import DEFAULT_PROMPT, IMAGE_PLACEHOLDER

HR = 32  # small images keep the suite fast
COLUMNS = [
    "prompt",
    "lr_image",
    "hr_image",
    "target_rough",
    "target_middle",
    "target_final",
    "degradation_params",
    "degradation_levels",
    "degradation_text",
    "degradation_measures",
    "label_version",
    "tags",
    "caption",
    "source",
]
IMAGE_COLUMNS = ["lr_image", "hr_image", "target_rough", "target_middle", "target_final"]


def photo(width: int, height: int, which: str = "astronaut") -> Image.Image:
    return Image.fromarray(getattr(skimage.data, which)()).resize((width, height), Image.Resampling.BILINEAR)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_good_files(folder):
    """Files that must all end up in the dataset (some after a mode conversion). Returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_photo.jpg").write_bytes(jpeg_bytes(photo(64, 48)))
    photo(40, 56, "chelsea").save(folder / "b_photo.png")
    photo(48, 48, "coffee").convert("L").save(folder / "grey.png")
    rgba = photo(48, 40, "rocket").convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    rgba.save(folder / "rgba.png")
    photo(36, 36, "chelsea").quantize(16).save(folder / "palette.png")
    sixteen = (np.asarray(photo(40, 40, "coffee").convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "sixteen.png")  # mode "I;16": a 16-bit grey PNG
    (folder / "large.jpg").write_bytes(jpeg_bytes(photo(1600, 1200, "rocket"), quality=80))
    (folder / "sub").mkdir(exist_ok=True)
    photo(50, 50, "coffee").save(folder / "sub" / "nested.png")
    # Annotations: a per-file sidecar and a folder-wide tags.json.
    (folder / "a_photo.json").write_text(json.dumps({"tags": ["woman", "flag"], "caption": "An astronaut."}))
    (folder / "tags.json").write_text(json.dumps({"b_photo.png": ["cat", "whiskers"]}))
    return [
        "a_photo.jpg",
        "b_photo.png",
        "grey.png",
        "large.jpg",
        "palette.png",
        "rgba.png",
        "sixteen.png",
        "sub/nested.png",
    ]


#: name -> (reason, how to write it)
BAD_FILES = {
    "truncated.jpg": ("corrupt", lambda path: path.write_bytes(jpeg_bytes(photo(64, 64))[:900])),
    "random.png": ("corrupt", lambda path: path.write_bytes(np.random.default_rng(0).bytes(3000))),
    "notes.txt": ("not_an_image", lambda path: path.write_text("these are not pixels\n")),
    "small.png": ("too_small", lambda path: photo(20, 24).save(path)),
    "bomb.png": ("too_large", lambda path: Image.new("RGB", (2000, 1600), (10, 20, 30)).save(path)),
    "z_duplicate.jpg": ("duplicate", lambda path: path.write_bytes(jpeg_bytes(photo(64, 48)))),
}
#: Just above large.jpg (1.92 Mpx), below bomb.png (3.2 Mpx).
MAX_PIXELS = 2_000_000


def write_bad_file(folder, name):
    BAD_FILES[name][1](folder / name)


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "hr"
    good = write_good_files(folder)
    for name in BAD_FILES:
        write_bad_file(folder, name)
    return folder, good


def build(source, cache_dir, **kwargs):
    kwargs.setdefault("hr_size", HR)
    kwargs.setdefault("max_image_pixels", MAX_PIXELS)
    return build_vlcot_dataset_with_summary(source, cache_dir=cache_dir, progress=False, **kwargs)


def raw_rows(dataset):
    """Rows with images as their stored PNG bytes, for exact comparisons."""
    for column in IMAGE_COLUMNS:
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return [{k: (v["bytes"] if k in IMAGE_COLUMNS else v) for k, v in row.items()} for row in dataset]


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_grey_rgba_palette_and_16_bit_images_become_8_bit_rgb():
    grey = read_rgb_image(encode(Image.new("L", (4, 4), 100)), "grey.png")
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (100, 100, 100)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 255, 0, 0))  # fully transparent green
    converted = read_rgb_image(encode(rgba), "rgba.png")
    assert converted.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert converted.getpixel((1, 1)) == (255, 0, 0)

    palette = Image.new("RGB", (4, 4), (0, 0, 200)).quantize(4)
    assert palette.mode == "P"
    assert read_rgb_image(encode(palette), "palette.png").getpixel((2, 2)) == (0, 0, 200)

    sixteen = Image.fromarray(np.array([[0, 32896, 65535, 1000]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    converted = read_rgb_image(encode(sixteen), "sixteen.png")
    assert [converted.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 4]  # scaled, not clipped

    for mode in ("1", "LA", "CMYK", "I", "F"):
        image = Image.new(mode, (3, 3))
        assert read_rgb_image(encode(image, "TIFF"), f"x.{mode}.tif").mode == "RGB"


def test_unreadable_inputs_raise_with_the_file_name():
    with pytest.raises(BadImageError, match=r"truncated\.jpg.*\[corrupt\]"):
        read_rgb_image(jpeg_bytes(photo(64, 64))[:900], "truncated.jpg")
    with pytest.raises(BadImageError, match=r"noise\.png.*\[corrupt\]"):
        read_rgb_image(b"\x89PNG not really", "noise.png")
    with pytest.raises(BadImageError, match=r"notes\.txt.*\[not_an_image\]"):
        read_rgb_image(b"hello", "notes.txt")
    with pytest.raises(BadImageError, match=r"empty\.png.*empty"):
        read_rgb_image(b"", "empty.png")
    with pytest.raises(BadImageError, match=r"huge\.png: 2000x1600 = 3200000 pixels.*max_image_pixels"):
        read_rgb_image(encode(Image.new("RGB", (2000, 1600))), "huge.png", max_image_pixels=MAX_PIXELS)


# ----------------------------------------------------------------------------------------------------------------
# Building from a folder
# ----------------------------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_with_a_warning_and_counted(mixed_folder, tmp_path, caplog):
    folder, good = mixed_folder
    with caplog.at_level(logging.WARNING, logger="vlcot_grpo.data.dataset"):
        dataset, summary = build(folder, tmp_path / "cache")
    assert sorted(dataset["source"]) == sorted(good)
    assert summary.kept == len(good) == summary.processed
    assert summary.skip_counts() == {"corrupt": 2, "not_an_image": 1, "too_small": 1, "too_large": 1, "duplicate": 1}
    warned = "\n".join(record.getMessage() for record in caplog.records)
    report = summary.format()
    for name, (reason, _) in BAD_FILES.items():
        assert re.search(rf"skipping {re.escape(name)}: .*\[{reason}\]", warned), name
        assert name in report
    assert "same content as a_photo.jpg" in report
    # Every kept image, whatever its mode and size, became a 32x32 RGB HR image.
    for image in dataset["hr_image"]:
        assert image.mode == "RGB" and image.size == (HR, HR)


@pytest.mark.parametrize("bad_name", sorted(BAD_FILES))
def test_strict_mode_raises_naming_the_bad_file(tmp_path, bad_name):
    folder = tmp_path / "hr"
    folder.mkdir()
    (folder / "a_photo.jpg").write_bytes(jpeg_bytes(photo(64, 48)))
    write_bad_file(folder, bad_name)
    with pytest.raises(BadImageError, match=re.escape(bad_name)) as error:
        build(folder, tmp_path / "cache", strict=True)
    assert error.value.reason == BAD_FILES[bad_name][0]


def test_small_images_can_be_upscaled_instead(tmp_path):
    folder = tmp_path / "hr"
    folder.mkdir()
    photo(20, 24).save(folder / "small.png")
    dataset, summary = build(folder, tmp_path / "cache", small_images="upscale")
    assert summary.skipped == [] and dataset[0]["hr_image"].size == (HR, HR)


def test_large_images_are_downscaled_then_centre_cropped(tmp_path):
    folder = tmp_path / "hr"
    folder.mkdir()
    wide = np.zeros((300, 900, 3), np.uint8)
    wide[:, 300:600] = 255  # white middle third
    Image.fromarray(wide).save(folder / "wide.png")
    dataset, _ = build(folder, tmp_path / "cache")
    hr = np.asarray(dataset[0]["hr_image"])
    assert hr.shape == (HR, HR, 3)
    assert hr[:, 2:-2].min() > 240  # the crop is the white centre, the whole image was shrunk first


def test_columns_types_and_contents(mixed_folder, tmp_path):
    folder, _ = mixed_folder
    dataset, _ = build(folder, tmp_path / "cache")
    assert dataset.column_names == COLUMNS
    features = dataset.features
    for column in IMAGE_COLUMNS:
        assert isinstance(features[column], datasets.Image)
    assert set(features["degradation_levels"]) == set(STEPS)
    row = dataset[dataset["source"].index("a_photo.jpg")]
    assert row["prompt"] == DEFAULT_PROMPT and IMAGE_PLACEHOLDER in row["prompt"]
    assert row["lr_image"].size == (HR // 4, HR // 4)
    assert [row[c].size for c in ("target_rough", "target_middle", "target_final")] == [(8, 8), (16, 16), (32, 32)]
    assert np.array_equal(np.asarray(row["target_final"]), np.asarray(row["hr_image"]))
    record = DegradationRecord.from_json(row["degradation_params"])
    assert record.hr_size == (HR, HR) and record.lr_size == (8, 8)
    assert set(row["degradation_levels"]) == set(STEPS)
    assert parse_degradation_text(row["degradation_text"]).levels == row["degradation_levels"]
    # Label version 2: the levels bucket the stored measures; the noise is the replay's residual noise.
    assert row["label_version"] == LABEL_VERSION and record.usm is not None  # gt_usm is on by default
    hr = np.asarray(row["hr_image"])
    assert row["degradation_measures"]["noise"] == pytest.approx(residual_noise(hr, record))
    assert row["degradation_measures"] == pytest.approx(degradation_measures(record, noise=residual_noise(hr, record)))
    assert row["degradation_levels"] == levels_from_measures(row["degradation_measures"])
    # The replay guarantee: the stored record on the stored HR gives the stored LR, byte for byte.
    assert np.array_equal(np.asarray(apply_degradation(hr, record)), np.asarray(row["lr_image"]))
    assert row["tags"] == ["woman", "flag"] and row["caption"] == "An astronaut."
    cat = dataset[dataset["source"].index("b_photo.png")]
    assert cat["tags"] == ["cat", "whiskers"] and cat["caption"] == ""
    assert dataset[dataset["source"].index("grey.png")]["tags"] == []


def test_options_prompt_stage_sizes_and_lr_size(tmp_path):
    folder = tmp_path / "hr"
    write_good_files(folder)
    prompt = f"Restore {IMAGE_PLACEHOLDER} please."
    dataset, _ = build(folder, tmp_path / "cache", prompt=prompt, stage_sizes=(8, 16, 24), lr_size=32)
    row = dataset[0]
    assert row["prompt"] == prompt
    assert row["target_final"].size == (24, 24) and row["lr_image"].size == (32, 32)
    assert DegradationRecord.from_json(row["degradation_params"]).output_resize.direction == "up"
    # The trainer's config form: a mapping by stage name with (height, width) pairs.
    by_name, _ = build(folder, tmp_path / "cache", stage_sizes={"rough": (8, 8), "middle": 16, "final": (24, 32)})
    assert by_name[0]["target_final"].size == (32, 24)  # PIL sizes are (width, height)
    with pytest.raises(ValueError, match="lacks the stage"):
        build(folder, tmp_path / "cache", stage_sizes={"rough": 8, "final": 32})
    with pytest.raises(ValueError, match="placeholder"):
        build(folder, tmp_path / "cache", prompt="no image here")
    with pytest.raises(FileNotFoundError, match="not found"):
        build(tmp_path / "missing", tmp_path / "cache")


def test_an_options_object_and_keywords_give_the_same_dataset(tmp_path):
    folder = tmp_path / "hr"
    write_good_files(folder)
    options = DatasetOptions(hr_size=HR, seed=5, max_image_pixels=MAX_PIXELS, progress=False)
    by_object, object_summary = build_vlcot_dataset_with_summary(folder, options, cache_dir=tmp_path / "a")
    by_keywords, keyword_summary = build_vlcot_dataset_with_summary(
        folder, hr_size=HR, seed=5, max_image_pixels=MAX_PIXELS, progress=False, cache_dir=tmp_path / "b"
    )
    assert raw_rows(by_object) == raw_rows(by_keywords)
    # The same settings key names the cache folder, whichever form the options came in.
    assert object_summary.cache_path.rsplit("/", 1)[1] == keyword_summary.cache_path.rsplit("/", 1)[1]
    # Keywords override the options object's fields.
    overridden = build_vlcot_dataset(folder, options, seed=6, cache_dir=tmp_path / "a")
    assert overridden["degradation_params"] != by_object["degradation_params"]
    with pytest.raises(TypeError, match="hr_sise"):
        build_vlcot_dataset(folder, hr_sise=HR, cache_dir=tmp_path / "a")


def test_same_seed_same_dataset_and_seeds_follow_the_content(tmp_path):
    folder = tmp_path / "hr"
    write_good_files(folder)
    first, _ = build(folder, tmp_path / "cache1", seed=3)
    second, _ = build(folder, tmp_path / "cache2", seed=3)
    assert raw_rows(first) == raw_rows(second)
    other, _ = build(folder, tmp_path / "cache3", seed=4)
    assert first["degradation_params"] != other["degradation_params"]
    # One image alone, under another name, gets the same degradation as in the full folder.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "b_photo.png", alone / "renamed.png")
    single, _ = build(alone, tmp_path / "cache4", seed=3)
    index = first["source"].index("b_photo.png")
    assert raw_rows(single)[0]["lr_image"] == raw_rows(first)[index]["lr_image"]


def test_degradations_per_image_gives_each_photo_the_seeds_that_follow(tmp_path):
    folder = tmp_path / "hr"
    write_good_files(folder)
    (folder / "broken.png").write_bytes(b"not an image")
    copies, summary = build(folder, tmp_path / "cache", seed=3, degradations_per_image=3)
    singles = [build(folder, tmp_path / f"single{k}", seed=3 + k)[0] for k in range(3)]
    n = len(singles[0])
    assert summary.kept == n and len(copies) == 3 * n
    # Copy k is the single-copy build at seed 3 + k, row for row.
    assert raw_rows(copies) == [row for single in singles for row in raw_rows(single)]
    # The HR image and targets are the photo's in every copy; the degradations differ.
    rows = raw_rows(copies)
    for i in range(n):
        assert rows[i]["hr_image"] == rows[n + i]["hr_image"] == rows[2 * n + i]["hr_image"]
        assert len({rows[k * n + i]["degradation_params"] for k in range(3)}) == 3
    # The unreadable file is reported once, not once per copy.
    assert [skip.source for skip in summary.skipped].count("broken.png") == 1
    with pytest.raises(ValueError, match="degradations_per_image must be >= 1, got 0"):
        build(folder, tmp_path / "cache", degradations_per_image=0)


def test_a_crash_mid_build_keeps_the_finished_images(tmp_path, monkeypatch):
    folder = tmp_path / "hr"
    folder.mkdir()
    for i, which in enumerate(["astronaut", "chelsea", "coffee", "rocket", "astronaut"]):
        photo(40 + i, 40, which).save(folder / f"img{i}.png")
    original = dataset_module.process_image
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(args[0].source)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "process_image", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(folder, tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("*/items/*/meta.json"))
    assert len(cached) == 2

    calls.clear()
    monkeypatch.setattr(
        dataset_module, "process_image", lambda *a, **k: (calls.append(a[0].source), original(*a, **k))
    )
    resumed, summary = build(folder, tmp_path / "cache")
    assert summary.from_cache == 2 and summary.processed == 3
    assert calls == ["img2.png", "img3.png", "img4.png"]
    monkeypatch.setattr(dataset_module, "process_image", original)
    fresh, _ = build(folder, tmp_path / "fresh-cache")
    assert raw_rows(resumed) == raw_rows(fresh)


def test_several_processes_give_the_same_dataset(tmp_path):
    folder = tmp_path / "hr"
    write_good_files(folder)
    (folder / "notes.txt").write_text("not an image")
    serial, _ = build(folder, tmp_path / "cache1")
    parallel, summary = build(folder, tmp_path / "cache2", num_proc=2)
    assert raw_rows(parallel) == raw_rows(serial)
    assert summary.skip_counts() == {"not_an_image": 1}


def test_build_from_a_datasets_dataset(tmp_path):
    images = [photo(48, 40), photo(40, 40, "chelsea").convert("L"), photo(10, 10)]
    source = datasets.Dataset.from_dict(
        {"image": images, "tags": [["woman"], [], ["tiny"]], "caption": ["astronaut", "", "too small"]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "tags": datasets.List(datasets.Value("string")),
                "caption": datasets.Value("string"),
            }
        ),
    )
    dataset, summary = build(source, tmp_path / "cache")
    assert dataset["source"] == ["row-000000.png", "row-000001.png"]
    assert dataset["tags"] == [["woman"], []] and dataset["caption"] == ["astronaut", ""]
    assert [s.source for s in summary.skipped] == ["row-000002.png"]
    with pytest.raises(ValueError, match="no image column 'picture'"):
        build_vlcot_dataset(source, image_column="picture", cache_dir=tmp_path / "cache", progress=False)


# ----------------------------------------------------------------------------------------------------------------
# The prepare-data command
# ----------------------------------------------------------------------------------------------------------------


def prepare_data(*argv):
    parser = argparse.ArgumentParser()
    add_prepare_data_arguments(parser)
    return run_prepare_data(parser.parse_args(list(argv)))


def test_prepare_data_on_good_and_bad_files(mixed_folder, tmp_path, capsys):
    folder, good = mixed_folder
    out = tmp_path / "out"
    common = ["--hr-dir", str(folder), "--hr-size", str(HR), "--cache-dir", str(tmp_path / "cache")]
    common += ["--max-image-pixels", str(MAX_PIXELS), "--no-progress"]
    assert prepare_data(*common, "--out", str(out), "--seed", "1") == 0
    printed = capsys.readouterr().out
    assert f"kept {len(good)} images" in printed and "skipped 6" in printed
    for name in BAD_FILES:
        assert name in printed
    saved = datasets.load_from_disk(str(out))
    assert saved.column_names == COLUMNS and len(saved) == len(good)
    assert saved[0]["lr_image"].size == (HR // 4, HR // 4)

    # A non-empty --out is refused unless --overwrite; --strict stops at the first bad file.
    assert prepare_data(*common, "--out", str(out)) == 2
    assert prepare_data(*common, "--out", str(tmp_path / "strict"), "--strict") == 1
    assert "z_duplicate.jpg" in capsys.readouterr().err  # duplicates are found first, while listing the files
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(f"Fix {IMAGE_PLACEHOLDER}\n")
    assert prepare_data(*common, "--out", str(out), "--overwrite", "--prompt-file", str(prompt_file)) == 0
    assert datasets.load_from_disk(str(out))[0]["prompt"] == f"Fix {IMAGE_PLACEHOLDER}"
    two = tmp_path / "two"
    assert prepare_data(*common, "--out", str(two), "--seed", "1", "--degradations-per-image", "2") == 0
    doubled = datasets.load_from_disk(str(two))
    sources = list(doubled["source"])
    assert len(doubled) == 2 * len(good) and sources[: len(good)] == sources[len(good) :]


# ----------------------------------------------------------------------------------------------------------------
# The bundled demo dataset
# ----------------------------------------------------------------------------------------------------------------


def test_demo_annotations_are_complete_and_freely_licensed():
    entries = demo_annotations(None)  # both splits
    assert len(entries) >= 6
    for entry in entries:
        licence = r"public domain|CC0|no known copyright restrictions"
        assert re.search(licence, entry["licence"], re.IGNORECASE), entry["name"]
        assert 3 <= len(entry["tags"]) <= 6
        assert entry["caption"].endswith(".") and len(entry["caption"]) > 20


def test_demo_dataset_builds_offline(tmp_path):
    dataset = build_demo_dataset(cache_dir=tmp_path)
    assert dataset.column_names == COLUMNS
    assert len(dataset) == len(demo_annotations())
    row = dataset[dataset["source"].index("chelsea.png")]
    assert row["tags"][0] == "cat" and "cat" in row["caption"]
    assert row["lr_image"].size == (16, 16) and row["target_final"].size == (64, 64)
    assert row["target_rough"].size == (16, 16) and row["target_middle"].size == (32, 32)
    assert raw_rows(build_demo_dataset(cache_dir=tmp_path / "again")) == raw_rows(dataset)


# ----------------------------------------------------------------------------------------------------------------
# Datasets built before label version 2
# ----------------------------------------------------------------------------------------------------------------

#: Levels a version-1 dataset could store (what the old labeller wrote is irrelevant: they must be replaced).
V1_LEVELS = {"blur": "light", "downsample": "light", "noise": "heavy", "compression": "light", "upsample": "medium"}


def old_dataset(rows: int = 3, broken_params=(), foreign_lr=()) -> datasets.Dataset:
    """A dataset as prepare-data saved it before label version 2: no label_version or degradation_measures
    columns, records without the usm field (the plain HR was degraded), levels of the old labeller. Rows in
    ``broken_params`` get unreadable JSON, rows in ``foreign_lr`` an LR this pipeline did not make."""
    columns = {name: [] for name in COLUMNS if name not in ("degradation_measures", "label_version")}
    for i, which in zip(range(rows), ["astronaut", "chelsea", "coffee", "rocket"]):
        hr = photo(HR, HR, which)
        record = sample_degradation(DegradationConfig(gt_usm=False), 10 + i, HR, 4)
        params = record.to_dict()
        del params["usm"]
        lr = apply_degradation(hr, record)
        if i in foreign_lr:
            lr = lr.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for name, value in (
            ("prompt", DEFAULT_PROMPT),
            ("lr_image", lr),
            ("hr_image", hr),
            ("target_rough", hr.resize((HR // 4, HR // 4))),
            ("target_middle", hr.resize((HR // 2, HR // 2))),
            ("target_final", hr),
            ("degradation_params", "{not json" if i in broken_params else json.dumps(params)),
            ("degradation_levels", V1_LEVELS),
            ("degradation_text", levels_to_text(V1_LEVELS)),
            ("tags", []),
            ("caption", ""),
            ("source", f"{which}.png"),
        ):
            columns[name].append(value)
    features = datasets.Features({k: v for k, v in dataset_module.dataset_features().items() if k in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def test_a_dataset_from_before_label_versions_loads_with_recomputed_levels(tmp_path):
    from types import SimpleNamespace

    from vlcot_grpo.script_utils import load_train_dataset

    old_dataset().save_to_disk(str(tmp_path / "old"))
    args = SimpleNamespace(dataset_name=str(tmp_path / "old"), dataset_train_split="train")
    with pytest.warns(
        LabelVersionWarning, match=r"label version 1 .*recomputed .* of 3 of its 3 older rows"
    ) as caught:
        loaded = load_train_dataset(args, None)
    assert "did not reproduce" not in str(caught[0].message)  # the replays gave the stored LR images
    assert loaded.column_names == COLUMNS
    assert label_versions(loaded) == [LABEL_VERSION] * 3
    for row in loaded:
        record = DegradationRecord.from_json(row["degradation_params"])
        assert record.usm is None  # replayed as it was built: no sharpening
        measures = degradation_measures(record, noise=residual_noise(np.asarray(row["hr_image"]), record))
        assert row["degradation_measures"] == pytest.approx(measures)
        assert row["degradation_levels"] == levels_from_measures(measures)
        assert parse_degradation_text(row["degradation_text"]).levels == row["degradation_levels"]
    assert any(row["degradation_levels"] != V1_LEVELS for row in loaded)
    # Once upgraded (or built now), nothing changes and nothing is said.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert upgrade_labels(loaded) is loaded


def test_rows_that_cannot_be_recomputed_are_flagged_not_changed():
    dataset = old_dataset(rows=2, broken_params={1}, foreign_lr={0})
    with pytest.warns(LabelVersionWarning) as caught:
        upgraded = upgrade_labels(dataset, name="old data")
    message = str(caught[0].message)
    assert "old data" in message and "1 of its 2 older rows" in message
    assert "1 replays did not reproduce the stored lr_image" in message
    assert "1 rows keep their label version 1 levels: unreadable degradation_params" in message
    assert label_versions(upgraded) == [LABEL_VERSION, 1]
    assert upgraded[1]["degradation_levels"] == V1_LEVELS
    assert upgraded[1]["degradation_measures"] == dict.fromkeys(STEPS)


def test_a_dataset_from_a_newer_labelling_is_refused():
    dataset = old_dataset(rows=1).add_column("label_version", [LABEL_VERSION + 1])
    with pytest.raises(ValueError, match="newer than this vlcot-grpo"):
        upgrade_labels(dataset)
    plain = datasets.Dataset.from_dict({"text": ["no degradation columns"]})
    assert upgrade_labels(plain) is plain
