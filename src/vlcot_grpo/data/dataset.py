"""Build VLCoT training datasets: HR photos in, degraded LR inputs + stage targets + degradation labels out.

:func:`build_vlcot_dataset` takes a folder of high-resolution (HR) images or a ``datasets.Dataset`` with an image
column and returns a ``datasets.Dataset`` with these columns:

========================  ===================  ====================================================================
column                    type                 content
========================  ===================  ====================================================================
``prompt``                string               the VLCoT prompt; contains ``IMAGE_PLACEHOLDER`` where the LR image goes
``lr_image``              Image                the degraded low-resolution input (``lr_size``, default hr_size / scale)
``hr_image``              Image                the HR image, resized (short side) and centre-cropped to ``hr_size``
``target_rough``          Image                HR resized to the rough stage size (default hr_size / 4)
``target_middle``         Image                HR resized to the middle stage size (default hr_size / 2)
``target_final``          Image                HR resized to the final stage size (default hr_size)
``degradation_params``    string               JSON of the :class:`DegradationRecord` that made ``lr_image``
``degradation_levels``    struct of 5 strings  step -> "light" / "medium" / "heavy", or null when not applied
``degradation_text``      string               e.g. "medium blur, light downsample, heavy noise, light compression"
``degradation_measures``  struct of 5 floats   step -> the measure its level buckets (docs/rewards.md), or null
``label_version``         int32                :data:`~vlcot_grpo.data.levels.LABEL_VERSION` of the levels (see below)
``tags``                  list of strings      object words (for the understanding reward); [] when unknown
``caption``               string               one-line description; "" when unknown
``source``                string               file name (relative to the folder) or the dataset row's name
========================  ===================  ====================================================================

Determinism: each image's degradation seed is derived from the global ``seed`` and the SHA-256 of the image's
*file content* (see :func:`image_seed`), not from its position. Adding, removing or renaming files never changes
the degradation of the others, and the same photo always gets the same degradation under the same seed.
With ``degradations_per_image`` n > 1 every image gives n rows, the k-th degraded as a build at ``seed + k`` would
degrade it (copies follow one another: all images at copy 0, then all at copy 1, ...); the HR image, stage targets,
tags and caption are the same in all n.

Caching: every processed image is written to ``cache_dir/<settings key>/items/<content hash>/`` the moment it is
done (atomically: written to a temporary folder, then renamed). The settings key hashes everything that changes
the pixels (sizes, scale, seed, degradation ranges, ...). A crash mid-build therefore loses nothing: a rerun finds
the finished images and only processes the rest. Prompt, tags, captions and level thresholds are applied when the
dataset is assembled, so changing them costs no reprocessing.

Label versions: a dataset saved before ``label_version`` existed (label version 1) still loads;
:func:`~vlcot_grpo.data.relabel.upgrade_labels`, which the training scripts call on every prepared dataset,
recomputes its levels from the stored records and HR images, and warns about rows it cannot recompute.

Bad input: every problem is either converted or skipped with a warning that names the file and the reason, and
counted in the :class:`BuildSummary`; ``strict=True`` raises :class:`BadImageError` instead of skipping.

* grey, grey+alpha, palette, CMYK, 16-bit ("I;16", "I") and float images -> converted to 8-bit RGB (16-bit values
  are divided by 257; transparent pixels are composited onto white; EXIF rotation is applied);
* corrupt or truncated files, files that are not images -> skipped ("corrupt" / "not_an_image");
* images whose short side is below ``hr_size`` -> skipped ("too_small") by default, because upscaling would teach
  the model that interpolation blur is "high quality"; ``small_images="upscale"`` upscales them instead;
* images with more than ``max_image_pixels`` pixels -> skipped ("too_large"), a guard against decompression bombs
  (files whose tiny size expands to gigabytes); large images below the limit are downscaled before cropping;
* files whose content is byte-identical to an earlier file (sorted order) -> skipped ("duplicate").
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlcot_grpo.data.degradations import (
    DegradationConfig,
    DegradationRecord,
    apply_degradation_with_residual_noise,
    sample_degradation,
    to_rgb8,
)
from vlcot_grpo.data.levels import STEPS, LevelThresholds, label_columns

# `datasets`, `tqdm` and `vlcot_grpo.vlcot` (which imports torch) are imported inside the functions that use them:
# worker processes (num_proc > 1) import this module, and without them it loads in well under a second.
if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from tqdm import tqdm

logger = logging.getLogger(__name__)

#: Bump when the cached files' format or the processing changes, so old caches are not reused.
#: 2: meta.json holds the residual noise (label version 2).
CACHE_FORMAT_VERSION = 2
#: File extensions treated as images (others are still tried, but reported as "not_an_image" when unreadable).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2"}
)
#: The image formats opened, by PIL format name: only their decoders run, whatever a file's extension says (PIL
#: would otherwise pick any of its plugins from the bytes, EPS through Ghostscript included).
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "JPEG2000")
#: Name of the folder-wide annotation file: {"file name": {"tags": [...], "caption": "..."} or [tags]}.
FOLDER_ANNOTATIONS_FILE = "tags.json"
SKIP_REASONS: tuple[str, ...] = ("corrupt", "not_an_image", "too_small", "too_large", "duplicate", "not_a_file")
#: PNG compression of the cached images: level 1 writes much faster than PIL's default 6 for slightly larger files.
_PNG_COMPRESS_LEVEL = 1
_STAGES = ("rough", "middle", "final")
_TARGET_COLUMNS = tuple(f"target_{stage}" for stage in _STAGES)
#: Sizes of the stage targets: three entries (rough, middle, final) or a mapping by stage name; each entry an int
#: side or a (height, width) pair. See normalise_stage_sizes.
StageSizes = Sequence[int | Sequence[int]] | Mapping[str, int | Sequence[int]]


def dataset_features() -> datasets.Features:
    """The column types of a VLCoT dataset (see the module table)."""
    import datasets

    return datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "lr_image": datasets.Image(),
            "hr_image": datasets.Image(),
            "target_rough": datasets.Image(),
            "target_middle": datasets.Image(),
            "target_final": datasets.Image(),
            "degradation_params": datasets.Value("string"),
            "degradation_levels": {step: datasets.Value("string") for step in STEPS},
            "degradation_text": datasets.Value("string"),
            "degradation_measures": {step: datasets.Value("float64") for step in STEPS},
            "label_version": datasets.Value("int32"),
            "tags": datasets.List(datasets.Value("string")),
            "caption": datasets.Value("string"),
            "source": datasets.Value("string"),
        }
    )


def default_cache_dir() -> Path:
    """``$VLCOT_GRPO_CACHE`` or ``~/.cache/vlcot_grpo``, plus ``/datasets``."""
    root = os.environ.get("VLCOT_GRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlcot_grpo")
    return Path(root) / "datasets"


# ----------------------------------------------------------------------------------------------------------------
# Errors and the summary
# ----------------------------------------------------------------------------------------------------------------


class BadImageError(ValueError):
    """An input that cannot become a training sample; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, source: str, reason: str, detail: str):
        super().__init__(f"{source}: {detail} [{reason}]")
        self.source = source
        self.reason = reason
        self.detail = detail


@dataclass
class SkippedFile:
    source: str
    reason: str
    detail: str


@dataclass
class BuildSummary:
    """What a build did: counts of kept images, of image copies processed now or found in the cache (one per image
    and degradation), and every skipped file."""

    kept: int = 0
    processed: int = 0
    from_cache: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    cache_path: str = ""

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(skip.reason for skip in self.skipped))

    def format(self) -> str:
        lines = [
            f"kept {self.kept} images ({self.processed} processed now, {self.from_cache} from the cache "
            f"{self.cache_path}); skipped {len(self.skipped)}"
        ]
        for reason, count in sorted(self.skip_counts().items()):
            lines.append(f"  {reason}: {count}")
        for skip in self.skipped:
            lines.append(f"  - {skip.source}: {skip.detail}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Settings (everything that changes the pixels) and the per-image seed
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSettings:
    """Settings that determine the cached pixels of every image; their hash names the cache folder."""

    hr_size: int
    scale: int
    lr_size: int
    stage_sizes: tuple[tuple[int, int], ...]  # (height, width) of the rough, middle and final targets
    seed: int
    small_images: str
    degradation: dict[str, Any]

    def key(self) -> str:
        payload = json.dumps({"version": CACHE_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def image_seed(seed: int, content_hash: str) -> int:
    """Per-image degradation seed: ``sha256("<seed>:<content hash>")`` as a 63-bit integer."""
    digest = hashlib.sha256(f"{seed}:{content_hash}".encode()).hexdigest()
    return int(digest[:16], 16) >> 1


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Reading any image file as 8-bit RGB
# ----------------------------------------------------------------------------------------------------------------


def read_rgb_image(
    data: bytes, source: str, max_image_pixels: int | None = None, min_short_side: int | None = None
) -> Image.Image:
    """Decode image bytes into an 8-bit RGB PIL image, or raise :class:`BadImageError` naming ``source``.

    ``max_image_pixels`` (default: PIL's ``Image.MAX_IMAGE_PIXELS``) is checked on the header, before any pixel is
    decoded. ``min_short_side`` lets large JPEGs decode at a reduced scale (still at least that short side).
    PIL's own bomb limit (twice ``Image.MAX_IMAGE_PIXELS``) applies as well.
    """
    limit = max_image_pixels or Image.MAX_IMAGE_PIXELS
    has_image_extension = Path(source).suffix.lower() in IMAGE_EXTENSIONS
    if not data:
        raise BadImageError(source, "corrupt" if has_image_extension else "not_an_image", "the file is empty")
    try:
        with warnings.catch_warnings():
            # We check the size ourselves right below, with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise BadImageError(
            source, "too_large", f"refused by PIL as a possible decompression bomb ({error})"
        ) from None
    except UnidentifiedImageError:
        accepted = ", ".join(ACCEPTED_FORMATS)
        if has_image_extension:
            raise BadImageError(
                source,
                "corrupt",
                f"cannot be decoded as an image of an accepted format ({accepted}): corrupt, or "
                "another format under an image file name?",
            ) from None
        raise BadImageError(source, "not_an_image", f"not an image file of an accepted format ({accepted})") from None
    width, height = image.size
    if width * height > limit:
        raise BadImageError(
            source,
            "too_large",
            f"{width}x{height} = {width * height} pixels is above max_image_pixels={limit} (a guard against "
            "decompression bombs); raise max_image_pixels / --max-image-pixels if you trust this file",
        )
    if min_short_side and image.format == "JPEG" and min(width, height) > 2 * min_short_side:
        # Decode at 1/2, 1/4 or 1/8 scale directly from the DCT: much faster and lighter for large photos.
        ratio = min_short_side / min(width, height)
        image.draft("RGB", (max(1, int(width * ratio) + 1), max(1, int(height * ratio) + 1)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
    except Exception as error:  # corrupt files make PIL raise almost anything: OSError, SyntaxError, ...
        raise BadImageError(
            source, "corrupt", f"cannot be decoded ({type(error).__name__}: {error}); truncated or corrupt file?"
        ) from None
    return to_rgb8(image)


def open_rgb_image(path: str | Path, max_image_pixels: int | None = None) -> Image.Image:
    """The image file at ``path`` as 8-bit RGB, through ``read_rgb_image`` (accepted formats only); raises
    :class:`BadImageError` naming the file, or OSError when it cannot be read."""
    return read_rgb_image(Path(path).read_bytes(), str(path), max_image_pixels)


# ----------------------------------------------------------------------------------------------------------------
# HR preparation and one image's processing
# ----------------------------------------------------------------------------------------------------------------


def prepare_hr(image: Image.Image, hr_size: int, source: str, small_images: str = "skip") -> Image.Image:
    """Resize so the short side is ``hr_size`` (downscaling large images first), then centre-crop a square."""
    width, height = image.size
    short_side = min(width, height)
    if short_side < hr_size and small_images == "skip":
        raise BadImageError(
            source,
            "too_small",
            f"{width}x{height} is smaller than hr_size={hr_size} (short side {short_side}); use "
            "small_images='upscale' / --small-images upscale to upscale such images instead",
        )
    if short_side != hr_size:
        new_size = (
            max(hr_size, round(width * hr_size / short_side)),
            max(hr_size, round(height * hr_size / short_side)),
        )
        # reducing_gap: shrink by an integer factor first (box filter), then Lanczos; fast on huge images.
        image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left = (image.width - hr_size) // 2
    top = (image.height - hr_size) // 2
    return image.crop((left, top, left + hr_size, top + hr_size))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Item:
    """One input image. Folder inputs carry a path, dataset inputs their encoded bytes."""

    source: str
    content_hash: str
    path: str | None = None
    data: bytes | None = None
    read_error: str | None = None  # set when the file could not even be read (permissions, I/O error)
    read_reason: str = "corrupt"  # the skip reason that goes with read_error

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        return Path(self.path).read_bytes()


def _entry_dir(cache_root: Path, item_hash: str) -> Path:
    return cache_root / "items" / item_hash


def process_image(item: _Item, settings: ImageSettings, cache_root: Path, max_image_pixels: int | None) -> None:
    """Decode, prepare, degrade and write one image's cache entry (atomically). Raises BadImageError to skip."""
    image = read_rgb_image(item.read(), item.source, max_image_pixels, min_short_side=settings.hr_size)
    hr = prepare_hr(image, settings.hr_size, item.source, settings.small_images)
    record = sample_degradation(
        DegradationConfig.from_dict(settings.degradation),
        image_seed(settings.seed, item.content_hash),
        settings.hr_size,
        settings.scale,
        output_size=settings.lr_size,
    )
    # The LR image and the noise left in it (the replay with the noise draws zeroed), which the noise level needs.
    lr, residual_noise = apply_degradation_with_residual_noise(np.asarray(hr), record)

    files = {"hr_image": _png_bytes(hr), "lr_image": _png_bytes(lr)}
    for column, (height, width) in zip(_TARGET_COLUMNS, settings.stage_sizes):
        same_as_hr = (height, width) == (settings.hr_size, settings.hr_size)
        target = hr if same_as_hr else hr.resize((width, height), Image.Resampling.LANCZOS)
        files[column] = files["hr_image"] if target is hr else _png_bytes(target)
    meta = {
        "source": item.source,
        "content_hash": item.content_hash,
        "original_size": list(image.size),
        "degradation_params": record.to_dict(),
        "residual_noise": residual_noise,
    }
    _write_entry(cache_root, item.content_hash, files, meta)


def _write_entry(cache_root: Path, item_hash: str, files: dict[str, bytes], meta: dict[str, Any]) -> None:
    final_dir = _entry_dir(cache_root, item_hash)
    temporary_dir = final_dir.with_name(f".tmp-{item_hash}-{os.getpid()}")
    shutil.rmtree(temporary_dir, ignore_errors=True)
    temporary_dir.mkdir(parents=True)
    for column, data in files.items():
        (temporary_dir / f"{column}.png").write_bytes(data)
    # meta.json last: its presence marks a complete entry even if the rename below were not atomic.
    (temporary_dir / "meta.json").write_text(json.dumps(meta, sort_keys=True))
    try:
        os.replace(temporary_dir, final_dir)
    except OSError:
        # Another process finished the same entry first; theirs is identical.
        shutil.rmtree(temporary_dir, ignore_errors=True)


def _is_cached(cache_root: Path, item_hash: str) -> bool:
    return (_entry_dir(cache_root, item_hash) / "meta.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Collecting the inputs and their annotations
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Annotation:
    tags: list[str] = field(default_factory=list)
    caption: str = ""


def _parse_annotation(value: Any, where: str) -> _Annotation | None:
    """``{"tags": [...], "caption": "..."}`` or a bare list of tags; None (with a warning) when malformed."""
    if isinstance(value, list):
        value = {"tags": value}
    if not isinstance(value, dict):
        logger.warning("ignoring annotation in %s: expected an object or a list of tags, got %r", where, value)
        return None
    tags = value.get("tags", [])
    if isinstance(tags, str):
        tags = [tag.strip() for tag in tags.split(",")]
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        logger.warning("ignoring tags in %s: expected a list of strings, got %r", where, tags)
        tags = []
    caption = value.get("caption", "")
    if not isinstance(caption, str):
        logger.warning("ignoring caption in %s: expected a string, got %r", where, caption)
        caption = ""
    return _Annotation(tags=[tag for tag in tags if tag], caption=caption.strip())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("ignoring annotation file %s: %s", path, error)
        return None


def _folder_annotations(folder: Path, image_path: Path, folder_files: dict[Path, Any]) -> _Annotation:
    """Sidecar ``<stem>.json`` or ``<file name>.json`` first, then the folder's ``tags.json``."""
    for sidecar in (image_path.with_suffix(".json"), image_path.with_name(image_path.name + ".json")):
        if sidecar.is_file() and sidecar.name != FOLDER_ANNOTATIONS_FILE:
            parsed = _parse_annotation(_read_json(sidecar), str(sidecar)) if sidecar.stat().st_size else None
            if parsed is not None:
                return parsed
    directory = image_path.parent
    if directory not in folder_files:
        annotations_path = directory / FOLDER_ANNOTATIONS_FILE
        folder_files[directory] = _read_json(annotations_path) if annotations_path.is_file() else None
    table = folder_files[directory]
    if isinstance(table, dict):
        for key in (image_path.name, image_path.relative_to(folder).as_posix(), image_path.stem):
            if key in table:
                parsed = _parse_annotation(table[key], f"{directory / FOLDER_ANNOTATIONS_FILE} [{key!r}]")
                if parsed is not None:
                    return parsed
    return _Annotation()


def _folder_items(folder: Path) -> Iterator[tuple[_Item, _Annotation]]:
    """Every non-hidden, non-JSON file under ``folder``, sorted by relative path; a dangling link, or a folder named
    like an image, comes as an item that cannot be read (so that the summary names it)."""
    annotation_tables: dict[Path, Any] = {}
    paths = sorted(folder.rglob("*"), key=lambda path: path.relative_to(folder).as_posix())
    for path in paths:
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() == ".json":
            continue  # hidden files and annotation sidecars
        if not path.is_file():
            if path.is_dir() and path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue  # an ordinary subfolder: its files are listed on their own
            what = "a folder named like an image file" if path.is_dir() else "not a regular file (a dangling link?)"
            yield (
                _Item(relative.as_posix(), "", path=str(path), read_error=what, read_reason="not_a_file"),
                _Annotation(),
            )
            continue
        try:
            data = path.read_bytes()
        except OSError as error:
            yield _Item(relative.as_posix(), "", path=str(path), read_error=str(error)), _Annotation()
            continue
        item = _Item(relative.as_posix(), content_hash(data), path=str(path))
        yield item, _folder_annotations(folder, path, annotation_tables)


def _encode_cell(value: Any) -> tuple[bytes, str | None]:
    """An image cell of a ``datasets.Dataset`` -> (encoded bytes, original path or None)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], value.get("path")
        if value.get("path"):
            return Path(value["path"]).read_bytes(), value["path"]
        return b"", None
    if isinstance(value, str):
        return Path(value).read_bytes(), value
    if isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue(), getattr(value, "filename", None) or None
    raise TypeError(f"unsupported image cell of type {type(value).__name__}")


def _dataset_items(
    source: datasets.Dataset, image_column: str, tags_column: str, caption_column: str, source_column: str | None
) -> Iterator[tuple[_Item, _Annotation]]:
    import datasets

    if image_column not in source.column_names:
        raise ValueError(f"the dataset has no image column {image_column!r}; columns: {source.column_names}")
    if isinstance(source.features[image_column], datasets.Image):
        # Raw bytes: hash the file content and let our reader convert modes and catch corrupt files.
        source = source.cast_column(image_column, datasets.Image(decode=False))
    for index, row in enumerate(source):
        data, path = _encode_cell(row[image_column])
        if source_column and row.get(source_column):
            name = str(row[source_column])
        elif path:
            name = Path(path).name
        else:
            name = f"row-{index:06d}.png"
        value = {"tags": row.get(tags_column) or [], "caption": row.get(caption_column) or ""}
        annotation = _parse_annotation(value, f"row {index} ({name})") or _Annotation()
        yield _Item(name, content_hash(data), data=data), annotation


# ----------------------------------------------------------------------------------------------------------------
# Running the per-image work (in this process or a pool)
# ----------------------------------------------------------------------------------------------------------------


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one image per process: OpenCV's own threads would only oversubscribe the cores


def _run_one(task: tuple[_Item, ImageSettings, Path, int | None]) -> tuple[str, str | None, str | None]:
    """(content hash, skip reason or None, detail). Unexpected errors propagate: they are bugs, not bad input."""
    item = task[0]
    try:
        process_image(*task)
    except BadImageError as error:
        return item.content_hash, error.reason, error.detail
    return item.content_hash, None, None


def _process_all(
    tasks: list[tuple[_Item, ImageSettings, Path, int | None]], num_proc: int, progress: tqdm
) -> Iterator[tuple[str, str | None, str | None]]:
    if num_proc <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _run_one(task)
            progress.update(1)
        return
    # "spawn" works the same on every OS and is safe after torch / OpenCV started threads (fork is not).
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(num_proc, len(tasks)), initializer=_worker_init) as pool:
        for outcome in pool.imap(_run_one, tasks):
            yield outcome
            progress.update(1)


# ----------------------------------------------------------------------------------------------------------------
# Assembling the dataset
# ----------------------------------------------------------------------------------------------------------------


def _generate_rows(
    entries: list[tuple[str, str, list[str], str]], prompt: str, thresholds: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Rows from cache entries ``(entry dir, source, tags, caption)``; used by ``Dataset.from_generator``."""
    level_thresholds = LevelThresholds(**{key: tuple(value) for key, value in thresholds.items()})
    for entry_dir, source, tags, caption in entries:
        entry = Path(entry_dir)
        meta = json.loads((entry / "meta.json").read_text())
        record = DegradationRecord.from_dict(meta["degradation_params"])
        row: dict[str, Any] = {"prompt": prompt}
        for column in ("lr_image", "hr_image", *_TARGET_COLUMNS):
            row[column] = {"bytes": (entry / f"{column}.png").read_bytes(), "path": None}
        row["degradation_params"] = record.to_json()
        row.update(label_columns(record, meta["residual_noise"], level_thresholds))
        row.update(tags=tags, caption=caption, source=source)
        yield row


def normalise_stage_sizes(stage_sizes: StageSizes | None, hr_size: int) -> tuple[tuple[int, int], ...]:
    """Stage target sizes as ``((h, w) rough, (h, w) middle, (h, w) final)``.

    Accepts None (default: hr/4, hr/2, hr), three entries in rough / middle / final order, or a mapping with the
    keys "rough", "middle", "final" (as ``VLCoTGRPOConfig.stage_sizes``); each entry an int side or ``(h, w)``.
    """
    if stage_sizes is None:
        stage_sizes = (hr_size // 4, hr_size // 2, hr_size)
    if isinstance(stage_sizes, Mapping):
        missing = [stage for stage in _STAGES if stage not in stage_sizes]
        if missing:
            raise ValueError(f"stage_sizes lacks the stage(s) {missing}; got keys {sorted(stage_sizes)}")
        stage_sizes = [stage_sizes[stage] for stage in _STAGES]
    if len(stage_sizes) != 3:
        raise ValueError(f"stage_sizes must have three entries (rough, middle, final), got {stage_sizes!r}")
    pairs = []
    for size in stage_sizes:
        height, width = (size, size) if isinstance(size, (int, np.integer)) else size
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f"stage sizes must be positive, got {size!r} in {stage_sizes!r}")
        pairs.append((int(height), int(width)))
    return tuple(pairs)


def _check_arguments(hr_size: int, scale: int, lr_size: int, small_images: str) -> None:
    if hr_size < 1 or scale < 1 or hr_size // scale < 1:
        raise ValueError(f"need hr_size >= scale >= 1, got hr_size={hr_size}, scale={scale}")
    if lr_size < 1:
        raise ValueError(f"lr_size must be positive, got {lr_size}")
    if small_images not in ("skip", "upscale"):
        raise ValueError(f"small_images must be 'skip' or 'upscale', got {small_images!r}")


@dataclass(frozen=True)
class DatasetOptions:
    """How :func:`build_vlcot_dataset` turns its source into a dataset; every field has a default."""

    hr_size: int = field(default=512, metadata={"help": "Side of the square HR image."})
    scale: int = field(default=4, metadata={"help": "Super-resolution factor: the LR side is hr_size // scale."})
    lr_size: int | None = field(
        default=None,
        metadata={"help": "Side of the stored LR image (default hr_size // scale); larger adds a final resize."},
    )
    stage_sizes: StageSizes | None = field(
        default=None,
        metadata={"help": "Rough / middle / final target sizes (default hr/4, hr/2, hr); see normalise_stage_sizes."},
    )
    seed: int = field(default=0, metadata={"help": "Global seed; each image's seed also depends on its content."})
    degradations_per_image: int = field(
        default=1,
        metadata={
            "help": "Rows per image, each with its own degradation: copy k uses seed + k, so copy 0 is the "
            "single-copy build and a build at seed + n with n copies shares no degradation with this one."
        },
    )
    prompt: str | None = field(
        default=None, metadata={"help": "Prompt with IMAGE_PLACEHOLDER; default vlcot_grpo.vlcot.DEFAULT_PROMPT."}
    )
    degradation_config: DegradationConfig | None = field(
        default=None, metadata={"help": "Degradation ranges; default Real-ESRGAN's."}
    )
    level_thresholds: LevelThresholds | None = field(
        default=None, metadata={"help": "Buckets of the light / medium / heavy levels; default LevelThresholds()."}
    )
    image_column: str = field(default="image", metadata={"help": "Image column of a datasets.Dataset source."})
    tags_column: str = field(default="tags", metadata={"help": "Tags column of a datasets.Dataset source."})
    caption_column: str = field(default="caption", metadata={"help": "Caption column of a datasets.Dataset source."})
    source_column: str | None = field(
        default=None, metadata={"help": "Column naming each row of a datasets.Dataset source; default the file name."}
    )
    small_images: str = field(
        default="skip", metadata={"help": "'skip' or 'upscale' images whose short side is below hr_size."}
    )
    max_image_pixels: int | None = field(
        default=None, metadata={"help": "Refuse larger images (decompression-bomb guard); default PIL's limit."}
    )
    strict: bool = field(
        default=False, metadata={"help": "Raise BadImageError on the first bad input instead of skipping it."}
    )
    num_proc: int = field(default=1, metadata={"help": "Worker processes for the per-image work."})
    cache_dir: str | os.PathLike | None = field(
        default=None, metadata={"help": "Where processed images are kept; default default_cache_dir()."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    @classmethod
    def from_keywords(cls, options: DatasetOptions | None = None, **overrides: Any) -> DatasetOptions:
        """``options`` (default: all defaults) with the fields named in ``overrides`` replaced."""
        known = {option.name for option in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown dataset option(s) {unknown}; the options are {sorted(known)}")
        return replace(options or cls(), **overrides)


def _image_settings(options: DatasetOptions) -> ImageSettings:
    """The options that change the pixels, checked; their hash names the cache folder."""
    lr_size = options.lr_size or options.hr_size // options.scale
    _check_arguments(options.hr_size, options.scale, lr_size, options.small_images)
    return ImageSettings(
        hr_size=options.hr_size,
        scale=options.scale,
        lr_size=lr_size,
        stage_sizes=normalise_stage_sizes(options.stage_sizes, options.hr_size),
        seed=options.seed,
        small_images=options.small_images,
        degradation=(options.degradation_config or DegradationConfig()).to_dict(),
    )


def _checked_prompt(prompt: str | None) -> str:
    from vlcot_grpo.vlcot import DEFAULT_PROMPT, IMAGE_PLACEHOLDER

    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if IMAGE_PLACEHOLDER not in prompt:
        raise ValueError(f"the prompt must contain the image placeholder {IMAGE_PLACEHOLDER!r}: {prompt[:200]!r}")
    return prompt


def _open_cache(settings: ImageSettings, cache_dir: str | os.PathLike | None) -> Path:
    cache_root = Path(cache_dir or default_cache_dir()) / settings.key()
    (cache_root / "items").mkdir(parents=True, exist_ok=True)
    (cache_root / "settings.json").write_text(json.dumps(asdict(settings), indent=2, sort_keys=True))
    return cache_root


class _Skipper:
    """Records a skipped input in the summary with a warning, or raises it when the build is strict."""

    def __init__(self, summary: BuildSummary, strict: bool):
        self.summary = summary
        self.strict = strict

    def __call__(self, source: str, reason: str, detail: str) -> None:
        if self.strict:
            raise BadImageError(source, reason, detail)
        logger.warning("skipping %s: %s [%s]", source, detail, reason)
        self.summary.skipped.append(SkippedFile(source, reason, detail))


def _collect_inputs(
    source: str | os.PathLike | datasets.Dataset, options: DatasetOptions, skip: _Skipper
) -> list[tuple[_Item, _Annotation]]:
    """Phase 1: the inputs in a stable order; unreadable files and duplicates (same bytes, keeping the first) are
    skipped here, before any decoding."""
    import datasets

    if isinstance(source, datasets.Dataset):
        inputs = _dataset_items(
            source, options.image_column, options.tags_column, options.caption_column, options.source_column
        )
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"HR image folder not found: {folder}")
        inputs = _folder_items(folder)
    items: list[tuple[_Item, _Annotation]] = []
    first_with_hash: dict[str, str] = {}
    for item, annotation in inputs:
        if item.read_error is not None:
            skip(item.source, item.read_reason, f"cannot read the file ({item.read_error})")
        elif item.content_hash in first_with_hash:
            skip(item.source, "duplicate", f"same content as {first_with_hash[item.content_hash]}")
        else:
            first_with_hash[item.content_hash] = item.source
            items.append((item, annotation))
    return items


def _process_missing(
    items: list[tuple[_Item, _Annotation]],
    settings: ImageSettings,
    cache_root: Path,
    options: DatasetOptions,
    skip: _Skipper,
) -> set[str]:
    """Phase 2: process what the cache does not have yet (each finished image is on disk immediately, so a crash
    loses nothing); returns the content hashes of the images rejected while processing."""
    from tqdm.auto import tqdm

    summary = skip.summary
    todo = [item for item, _ in items if not _is_cached(cache_root, item.content_hash)]
    summary.from_cache += len(items) - len(todo)
    tasks = [(item, settings, cache_root, options.max_image_pixels) for item in todo]
    sources = {item.content_hash: item.source for item in todo}
    rejected: set[str] = set()
    with tqdm(
        total=len(items), initial=summary.from_cache, desc="prepare-data", unit="img", disable=not options.progress
    ) as bar:
        for item_hash, reason, detail in _process_all(tasks, options.num_proc, bar):
            if reason is None:
                summary.processed += 1
            else:
                rejected.add(item_hash)
                skip(sources[item_hash], reason, detail)
    return rejected


def _assemble_dataset(
    entries: list[tuple[str, str, list[str], str]], cache_root: Path, prompt: str, options: DatasetOptions
) -> datasets.Dataset:
    """Phase 3: the rows, in input order, from the cache entries; prompt and levels are applied only here, so
    changing them costs no reprocessing."""
    import datasets

    if not entries:
        return datasets.Dataset.from_dict({name: [] for name in dataset_features()}, features=dataset_features())
    bars_were_enabled = not datasets.utils.are_progress_bars_disabled()
    if not options.progress:
        datasets.utils.disable_progress_bars()
    try:
        return datasets.Dataset.from_generator(
            _generate_rows,
            features=dataset_features(),
            cache_dir=str(cache_root / "arrow"),
            gen_kwargs={
                "entries": entries,
                "prompt": prompt,
                "thresholds": asdict(options.level_thresholds or LevelThresholds()),
            },
        )
    finally:
        if bars_were_enabled:
            datasets.utils.enable_progress_bars()


def build_vlcot_dataset_with_summary(
    source: str | os.PathLike | datasets.Dataset, options: DatasetOptions | None = None, **overrides: Any
) -> tuple[datasets.Dataset, BuildSummary]:
    """:func:`build_vlcot_dataset`, also returning the :class:`BuildSummary` (counts of images, not rows)."""
    import datasets

    options = DatasetOptions.from_keywords(options, **overrides)
    if options.degradations_per_image < 1:
        raise ValueError(f"degradations_per_image must be >= 1, got {options.degradations_per_image}")
    first = _image_settings(options)  # bad sizes fail here, before any file is read
    prompt = _checked_prompt(options.prompt)
    summary = BuildSummary()
    skip = _Skipper(summary, options.strict)
    items = _collect_inputs(source, options, skip)
    parts = []
    # Each copy is a build at its own seed with its own cache folder; an image rejected by copy 0 (unreadable,
    # too small) is not tried again.
    for copy in range(options.degradations_per_image):
        settings = replace(first, seed=options.seed + copy)
        cache_root = _open_cache(settings, options.cache_dir)
        summary.cache_path = summary.cache_path or str(cache_root)
        rejected = _process_missing(items, settings, cache_root, options, skip)
        items = [(item, annotation) for item, annotation in items if item.content_hash not in rejected]
        entries = [
            (str(_entry_dir(cache_root, item.content_hash)), item.source, annotation.tags, annotation.caption)
            for item, annotation in items
        ]
        parts.append(_assemble_dataset(entries, cache_root, prompt, options))
    summary.kept = len(items)
    logger.info("prepare-data: %s", summary.format())
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return dataset, summary


def build_vlcot_dataset(
    source: str | os.PathLike | datasets.Dataset, options: DatasetOptions | None = None, **overrides: Any
) -> datasets.Dataset:
    """Build a VLCoT dataset from a folder of HR images or a ``datasets.Dataset`` with an image column.

    Args:
        source: a folder (searched recursively; ``.json`` files are annotations, hidden files are ignored) or a
            ``datasets.Dataset`` whose ``image_column`` holds images (optional ``tags_column``,
            ``caption_column``, ``source_column``).
        options: a :class:`DatasetOptions` (default: all defaults); each field is documented there.
        overrides: fields of :class:`DatasetOptions` by name, replacing those of ``options``
            (``build_vlcot_dataset(folder, hr_size=256)``); an unknown name raises TypeError.

    A summary of kept / skipped images is logged; use :func:`build_vlcot_dataset_with_summary` to get it.
    """
    dataset, _ = build_vlcot_dataset_with_summary(source, options, **overrides)
    return dataset
