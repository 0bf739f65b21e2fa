"""Degradation ops, sampler and applier: each op checked against what its parameters promise."""

import dataclasses
import io
import json
import math

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy import ndimage

from vlcot_grpo.data import degradations as deg


def principal_axis_angle(kernel: np.ndarray) -> float:
    """Angle of the kernel's long axis in (column, row) coordinates, from its second moments, in [0, pi).

    Moments are taken inside the inscribed disc, so the square window's corners do not bias heavy-tailed kernels.
    """
    half = kernel.shape[0] // 2
    axis = np.arange(-half, half + 1, dtype=np.float64)
    x, y = np.meshgrid(axis, axis)
    weights = np.where(x**2 + y**2 <= half**2, kernel, 0.0)
    mxx, myy, mxy = (weights * x * x).sum(), (weights * y * y).sum(), (weights * x * y).sum()
    return (0.5 * math.atan2(2 * mxy, mxx - myy)) % math.pi


def angle_difference(a: float, b: float) -> float:
    """Distance between two axis angles (mod pi)."""
    d = (a - b) % math.pi
    return min(d, math.pi - d)


@pytest.fixture(scope="module")
def photo_crop() -> np.ndarray:
    return skimage.data.astronaut()[100:228, 150:278].copy()


ALL_KERNELS = [
    deg.KernelParams("iso", 21, sigma_x=2.0, sigma_y=2.0, rotation=0.0),
    deg.KernelParams("aniso", 15, sigma_x=3.0, sigma_y=0.7, rotation=0.6),
    deg.KernelParams("generalized_iso", 13, sigma_x=1.5, sigma_y=1.5, rotation=0.0, beta=0.6),
    deg.KernelParams("generalized_aniso", 21, sigma_x=2.5, sigma_y=1.0, rotation=-1.0, beta=3.5),
    deg.KernelParams("plateau_iso", 9, sigma_x=1.2, sigma_y=1.2, rotation=0.0, beta=1.5),
    deg.KernelParams("plateau_aniso", 21, sigma_x=2.8, sigma_y=0.9, rotation=2.2, beta=1.2),
    deg.KernelParams("sinc", 7, cutoff=math.pi / 3),
    deg.KernelParams("sinc", 21, cutoff=math.pi / 5),
]


@pytest.mark.parametrize("params", ALL_KERNELS, ids=lambda p: f"{p.kind}-{p.size}")
def test_kernels_sum_to_one_and_have_the_requested_size(params):
    kernel = deg.make_kernel(params)
    assert kernel.shape == (params.size, params.size)
    assert kernel.dtype == np.float32
    assert abs(float(kernel.sum()) - 1.0) < 1e-5


@pytest.mark.parametrize(
    "params",
    [p for p in ALL_KERNELS if p.kind in ("iso", "generalized_iso", "plateau_iso", "sinc")],
    ids=lambda p: f"{p.kind}-{p.size}",
)
def test_isotropic_kernels_are_symmetric(params):
    kernel = deg.make_kernel(params)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-7)
    np.testing.assert_allclose(kernel, kernel[::-1, :], atol=1e-7)
    np.testing.assert_allclose(kernel, kernel[:, ::-1], atol=1e-7)
    # Isotropic: no preferred direction, so both axes spread the same.
    half = params.size // 2
    axis = np.arange(-half, half + 1)
    assert abs((kernel.sum(0) * axis**2).sum() - (kernel.sum(1) * axis**2).sum()) < 1e-6


@pytest.mark.parametrize("kind", ["aniso", "generalized_aniso", "plateau_aniso"])
@pytest.mark.parametrize("rotation", [0.0, 0.4, 1.2, -0.9, 2.5])
def test_anisotropic_kernel_long_axis_follows_the_rotation(kind, rotation):
    params = deg.KernelParams(kind, 31, sigma_x=4.0, sigma_y=1.2, rotation=rotation, beta=1.0)
    kernel = deg.make_kernel(params)
    assert angle_difference(principal_axis_angle(kernel), rotation % math.pi) < 0.03


def test_rotated_kernel_equals_the_unrotated_kernel_rotated():
    unrotated = deg.gaussian_kernel(41, 5.0, 1.5, rotation=0.0)
    # A quarter turn is exact on the pixel grid.
    np.testing.assert_allclose(deg.gaussian_kernel(41, 5.0, 1.5, rotation=math.pi / 2), np.rot90(unrotated), atol=1e-7)
    # Any angle: rotate the unrotated kernel's image by the same angle (interpolation => loose tolerance).
    theta = 0.5
    rotated = deg.gaussian_kernel(41, 5.0, 1.5, rotation=theta)
    # ndimage.rotate turns counter-clockwise as displayed (rows downwards), i.e. by -theta in (column, row) axes.
    turned = ndimage.rotate(unrotated, angle=-math.degrees(theta), reshape=False, order=3)
    turned /= turned.sum()
    assert np.abs(turned - rotated).max() < 0.02 * rotated.max()
    assert np.abs(np.rot90(unrotated) - rotated).max() > 0.2 * rotated.max()  # the check can fail


@pytest.mark.parametrize("sigma", [0.8, 1.5, 2.5])
def test_gaussian_blur_spreads_a_point_by_sigma(sigma):
    image = np.zeros((61, 61, 3), np.float32)
    image[30, 30] = 1.0
    blurred = deg.blur(image, deg.gaussian_kernel(21, sigma))[..., 0].astype(np.float64)
    axis = np.arange(61) - 30
    weights = blurred / blurred.sum()
    std_x = math.sqrt((weights.sum(0) * axis**2).sum())
    std_y = math.sqrt((weights.sum(1) * axis**2).sum())
    assert std_x == pytest.approx(sigma, rel=0.03)
    assert std_y == pytest.approx(sigma, rel=0.03)


@pytest.mark.parametrize("params", ALL_KERNELS, ids=lambda p: f"{p.kind}-{p.size}")
def test_fast_blur_matches_a_plain_2d_filter(params, photo_crop):
    image = photo_crop.astype(np.float32) / 255
    kernel = deg.make_kernel(params)
    expected = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    assert np.abs(deg.blur(image, kernel) - expected).max() < 1e-5


@pytest.mark.parametrize("sigma", [5.0, 20.0])
@pytest.mark.parametrize("grey", [False, True])
def test_gaussian_noise_has_the_requested_std(sigma, grey):
    flat = np.full((200, 200, 3), 0.5, np.float32)
    noisy = deg.add_gaussian_noise(flat, sigma, grey=grey, seed=1)
    noise = (noisy - flat) * 255
    assert noise.std() == pytest.approx(sigma, rel=0.03)
    assert abs(noise.mean()) < 0.1 * sigma
    channels_equal = np.array_equal(noise[..., 0], noise[..., 1]) and np.array_equal(noise[..., 1], noise[..., 2])
    assert channels_equal == grey


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_poisson_noise_has_the_shot_noise_std(scale):
    flat = np.full((200, 200, 3), 128 / 255, np.float32)
    noise = deg.add_poisson_noise(flat, scale, grey=False, seed=2) - flat
    expected_std = scale * math.sqrt((128 / 255) / 256)  # std of Poisson(v * 256) / 256
    assert noise.std() == pytest.approx(expected_std, rel=0.03)
    grey_noise = deg.add_poisson_noise(flat, scale, grey=True, seed=2) - flat
    assert np.array_equal(grey_noise[..., 0], grey_noise[..., 2])


@pytest.mark.parametrize("grey_level", [1, 3, 10])
def test_exact_poisson_draws_for_dark_pixels_follow_the_poisson_law(grey_level):
    flat = np.full((300, 300, 1), grey_level / 255, np.float32).repeat(3, axis=2)
    rate = grey_level / 255 * 256
    counts = np.round(deg.add_poisson_noise(flat, 1.0, grey=False, seed=3) * 256).astype(int)
    # Clipping at 1.0 never happens for these dark levels, so counts are the raw Poisson draws.
    assert counts.mean() == pytest.approx(rate, rel=0.02)
    assert counts.var() == pytest.approx(rate, rel=0.05)
    assert (counts == 0).mean() == pytest.approx(math.exp(-rate), abs=0.01)


def test_higher_jpeg_quality_gives_a_larger_file_and_a_smaller_error(photo_crop):
    image = photo_crop.astype(np.float32) / 255
    sizes, errors = [], []
    for quality in (20, 50, 80, 95):
        sizes.append(len(deg.jpeg_encode(image, quality)))
        errors.append(float(np.abs(deg.jpeg_compress(image, quality) - image).mean()))
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4
    with pytest.raises(ValueError, match="quality"):
        deg.jpeg_encode(image, 0)


def test_resize_modes_and_sizes(photo_crop):
    image = photo_crop.astype(np.float32) / 255
    for mode in deg.RESIZE_MODES:
        assert deg.resize(image, (40, 50), mode).shape == (40, 50, 3)
    assert deg.resize(image, image.shape[:2], "bicubic") is image
    assert deg.scaled_size((128, 100), 0.15) == (19, 15)
    with pytest.raises(ValueError, match="unknown resize mode"):
        deg.resize(image, (10, 10), "nearest")


def test_same_seed_gives_a_byte_identical_lr_image(photo_crop):
    first = deg.apply_degradation(photo_crop, deg.sample_degradation(None, 7, 128, 4)).tobytes()
    second = deg.apply_degradation(photo_crop, deg.sample_degradation(None, 7, 128, 4)).tobytes()
    other = deg.apply_degradation(photo_crop, deg.sample_degradation(None, 8, 128, 4)).tobytes()
    assert first == second
    assert first != other


def test_record_json_round_trip_replays_identically(photo_crop):
    for seed in range(5):
        record = deg.sample_degradation(None, seed, 128, 4)
        restored = deg.DegradationRecord.from_json(record.to_json())
        assert restored == record
        original = np.asarray(deg.apply_degradation(photo_crop, record))
        replayed = np.asarray(deg.apply_degradation(photo_crop, restored))
        assert np.array_equal(original, replayed)


def test_lr_size_and_output_size(photo_crop):
    record = deg.sample_degradation(None, 0, (128, 128), 4)
    assert record.lr_size == (32, 32)
    assert deg.apply_degradation(photo_crop, record).size == (32, 32)
    canvas = deg.sample_degradation(None, 0, 128, 4, output_size=128)
    assert canvas.output_resize.out_size == (128, 128) and canvas.output_resize.direction == "up"
    assert deg.apply_degradation(photo_crop, canvas).size == (128, 128)
    with pytest.raises(ValueError, match="drawn for"):
        deg.apply_degradation(photo_crop[:100], record)


def test_sampler_stays_within_the_configured_ranges():
    config = deg.DegradationConfig()
    orders, first_directions, kinds = set(), set(), set()
    for seed in range(300):
        record = deg.sample_degradation(config, seed, 64, 4)
        first, second = record.first_stage, record.second_stage
        assert first.blur is not None  # stage 1 always blurs
        for stage, ranges in ((first, config.first_stage), (second, config.second_stage)):
            if stage.blur is not None:
                kinds.add(stage.blur.kind)
                assert stage.blur.size in ranges.kernel_sizes
                if stage.blur.kind == "sinc":
                    assert math.pi / 5 <= stage.blur.cutoff <= math.pi
                else:
                    for sigma in (stage.blur.sigma_x, stage.blur.sigma_y):
                        assert ranges.blur_sigma[0] <= sigma <= ranges.blur_sigma[1]
            noise = stage.noise
            if noise.kind == "gaussian":
                assert ranges.noise_sigma[0] <= noise.sigma <= ranges.noise_sigma[1]
            else:
                assert ranges.poisson_scale[0] <= noise.scale <= ranges.poisson_scale[1]
        assert 30 <= first.jpeg_quality <= 95 and second.jpeg_quality is None
        assert 30 <= record.final.jpeg_quality <= 95
        assert record.final.resize.out_size == record.lr_size
        low, high = config.first_stage.resize_scale
        assert low <= first.resize.scale <= high
        orders.add(record.final.order)
        first_directions.add(first.resize.direction)
    assert orders == set(deg.FINAL_ORDERS)
    assert first_directions == {"up", "down", "keep"}
    assert kinds == set(deg.KERNEL_KINDS)


def test_config_controls_the_sampler():
    always_sinc = deg.DegradationConfig(first_stage=deg.StageConfig(sinc_prob=1.0, gaussian_noise_prob=0.0))
    record = deg.sample_degradation(always_sinc, 0, 64, 4)
    assert record.first_stage.blur.kind == "sinc"
    assert record.first_stage.noise.kind == "poisson"
    no_second_blur = deg.DegradationConfig(
        second_stage=dataclasses.replace(deg.StageConfig.second_stage(), blur_prob=0.0)
    )
    assert all(deg.sample_degradation(no_second_blur, s, 64, 4).second_stage.blur is None for s in range(20))


def test_config_validation_names_the_field_and_value():
    with pytest.raises(ValueError, match="resize_probs"):
        deg.StageConfig(resize_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="blur_sigma"):
        deg.StageConfig(blur_sigma=(3.0, 1.0))
    with pytest.raises(ValueError, match="kernel size"):
        deg.StageConfig(kernel_sizes=(7, 8))
    with pytest.raises(ValueError, match="unknown DegradationConfig fields"):
        deg.DegradationConfig.from_dict({"final_sinc_probability": 0.5})
    with pytest.raises(ValueError, match="sigma_x"):
        deg.make_kernel(deg.KernelParams("iso", 7))


def test_config_dict_round_trip():
    config = deg.DegradationConfig(final_sinc_prob=0.3, first_stage=deg.StageConfig(noise_sigma=(2.0, 4.0)))
    assert deg.DegradationConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------------------------------------------
# Unsharp masking of the HR (Real-ESRGAN's gt_usm)
# ----------------------------------------------------------------------------------------------------------------


def test_usm_sharpen_follows_its_formula_and_sharpens_edges():
    image = np.zeros((64, 64, 3), np.float32)
    image[:, 32:] = 0.6
    image[:, :32] = 0.2
    sharpened = deg.usm_sharpen(image)
    # Real-ESRGAN's numbers: size 51, OpenCV's sigma for it (8.0), weight 0.5, threshold 10.
    kernel = cv2.getGaussianKernel(51, 0)
    blurred = cv2.sepFilter2D(image.astype(np.float64), -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
    residual = image - blurred
    soft = cv2.sepFilter2D(
        (np.abs(residual) * 255 > 10).astype(np.float64), -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101
    )
    expected = soft * np.clip(image + 0.5 * residual, 0, 1) + (1 - soft) * image
    np.testing.assert_allclose(sharpened, expected, atol=1e-5)
    # Overshoot on both sides of the edge; far from it (flat, residual below the threshold) nothing changes much.
    assert sharpened[32, 30, 0] < 0.2 - 0.02 and sharpened[32, 33, 0] > 0.6 + 0.02
    flat = np.full((20, 20, 3), 0.3, np.float32)
    np.testing.assert_allclose(deg.usm_sharpen(flat), flat, atol=1e-6)


def test_gt_usm_is_on_by_default_recorded_and_replayed(photo_crop):
    record = deg.sample_degradation(None, 3, 128, 4)
    assert record.usm == deg.UsmParams(weight=0.5, radius=50, threshold=10.0)
    plain = deg.sample_degradation(deg.DegradationConfig(gt_usm=False), 3, 128, 4)
    assert plain.usm is None
    # The switch draws nothing: every other draw of the seed is the same.
    assert dataclasses.replace(record, usm=None) == plain
    sharpened_lr = np.asarray(deg.apply_degradation(photo_crop, record))
    plain_lr = np.asarray(deg.apply_degradation(photo_crop, plain))
    assert not np.array_equal(sharpened_lr, plain_lr)
    # The record carries it through JSON, and the replay is bit-exact.
    restored = deg.DegradationRecord.from_json(record.to_json())
    assert restored == record and json.loads(record.to_json())["usm"]["radius"] == 50
    assert np.array_equal(np.asarray(deg.apply_degradation(photo_crop, restored)), sharpened_lr)
    custom = deg.sample_degradation(deg.DegradationConfig(usm_weight=1.0, usm_radius=20), 3, 128, 4)
    assert custom.usm == deg.UsmParams(weight=1.0, radius=20, threshold=10.0)
    with pytest.raises(ValueError, match="usm radius"):
        deg.DegradationConfig(usm_radius=0)


def test_a_record_from_before_usm_loads_and_replays_without_sharpening(photo_crop):
    plain = deg.sample_degradation(deg.DegradationConfig(gt_usm=False), 5, 128, 4)
    old = plain.to_dict()
    del old["usm"]  # records written before the field existed
    loaded = deg.DegradationRecord.from_dict(old)
    assert loaded.usm is None and loaded == plain
    assert np.array_equal(
        np.asarray(deg.apply_degradation(photo_crop, loaded)), np.asarray(deg.apply_degradation(photo_crop, plain))
    )


# ----------------------------------------------------------------------------------------------------------------
# Inputs converted the way prepare-data reads files
# ----------------------------------------------------------------------------------------------------------------


def test_pil_inputs_are_read_like_prepare_data(photo_crop):
    from vlcot_grpo.data.dataset import read_rgb_image

    record = deg.sample_degradation(None, 1, 128, 4)
    grey8 = Image.fromarray(photo_crop).convert("L")
    sixteen = Image.fromarray((np.asarray(grey8, np.uint16) * 257).astype(np.uint16))
    assert sixteen.mode == "I;16"
    rgba = Image.fromarray(photo_crop).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(128, dtype=np.uint8) * 2, (128, 1))))
    for image in (grey8, sixteen, rgba):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        as_prepared = read_rgb_image(buffer.getvalue(), "x.png")
        assert np.array_equal(
            np.asarray(deg.apply_degradation(image, record)), np.asarray(deg.apply_degradation(as_prepared, record))
        )
    # The 16-bit image is scaled, not saturated: it degrades like its 8-bit version.
    assert np.array_equal(
        np.asarray(deg.apply_degradation(sixteen, record)), np.asarray(deg.apply_degradation(grey8, record))
    )


def test_array_inputs_are_converted_or_refused_with_a_message(photo_crop):
    reference = deg.as_float_rgb(photo_crop)
    np.testing.assert_array_equal(deg.as_float_rgb(photo_crop.astype(np.float32)), reference)  # float 0-255
    np.testing.assert_allclose(deg.as_float_rgb(photo_crop.astype(np.uint16) * 257), reference, atol=1e-6)
    np.testing.assert_array_equal(deg.as_float_rgb(photo_crop / np.float32(255)), reference)  # float 0-1
    grey = photo_crop[..., 0]
    np.testing.assert_array_equal(deg.as_float_rgb(grey), np.repeat(reference[..., :1], 3, axis=2))
    np.testing.assert_array_equal(deg.as_float_rgb(grey[..., None]), deg.as_float_rgb(grey))
    # RGBA and grey + alpha: composited onto white, as prepare-data does (PIL rounds to 8 bits: within 1/255).
    alpha = np.tile(np.arange(128, dtype=np.uint8) * 2, (128, 1))[..., None]
    rgba = np.concatenate([photo_crop, alpha], axis=2)
    composited = np.asarray(deg.to_rgb8(Image.fromarray(rgba, "RGBA"))) / 255.0
    assert np.abs(deg.as_float_rgb(rgba) - composited).max() <= 1 / 255 + 1e-6
    assert deg.as_float_rgb(np.concatenate([grey[..., None], alpha], axis=2)).shape == (128, 128, 3)
    assert deg.as_float_rgb(np.full((4, 4, 4), [10, 20, 30, 0], np.uint8)).min() == 1.0  # transparent -> white
    # Wrong inputs are refused, saying why.
    with pytest.raises(ValueError, match="up to 300"):
        deg.as_float_rgb(np.full((4, 4, 3), 300.0))
    with pytest.raises(ValueError, match="NaN"):
        deg.as_float_rgb(np.full((4, 4, 3), np.nan))
    with pytest.raises(ValueError, match="0..65535"):
        deg.as_float_rgb(np.full((4, 4, 3), -1, np.int32))
    with pytest.raises(ValueError, match="shape"):
        deg.as_float_rgb(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="dtype bool"):
        deg.as_float_rgb(np.zeros((4, 4, 3), bool))
    # apply_degradation takes them all.
    record = deg.sample_degradation(None, 2, 128, 4)
    assert np.array_equal(
        np.asarray(deg.apply_degradation(photo_crop.astype(np.float32), record)),
        np.asarray(deg.apply_degradation(photo_crop, record)),
    )


def test_replay_without_noise_and_at_the_lr_size(photo_crop):
    record = deg.sample_degradation(None, 4, 128, 4, output_size=128)
    full = deg.apply_degradation_array(photo_crop, record)
    assert full.shape == (128, 128, 3)
    at_lr = deg.apply_degradation_array(photo_crop, record, at_lr_size=True)
    assert at_lr.shape == (32, 32, 3)
    quiet = deg.apply_degradation_array(photo_crop, record, noise=False, at_lr_size=True)
    assert not np.array_equal(quiet, at_lr)
    assert np.array_equal(quiet, deg.apply_degradation_array(photo_crop, deg.without_noise(record), at_lr_size=True))
    lr, residual = deg.apply_degradation_with_residual_noise(photo_crop, record)
    assert np.array_equal(np.asarray(lr), full)  # the stored LR is the plain replay, bit for bit
    assert residual == pytest.approx(float(np.std(at_lr.astype(np.float64) - quiet)))
    zero = deg.without_noise(record)
    assert zero.first_stage.noise.seed == record.first_stage.noise.seed
    assert {zero.first_stage.noise.sigma or 0.0, zero.first_stage.noise.scale or 0.0} == {0.0}
