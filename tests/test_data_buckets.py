"""Buckets: the worked examples of spec §7.2 exactly, properties, fitting images into buckets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer.data.buckets import crop_box, crop_offset, make_buckets, nearest_bucket, pick_sub_buckets, resize_and_crop
from trainer.data.errors import DataError

# --- §7.2 worked examples ------------------------------------------------------------


def test_defaults() -> None:
    assert make_buckets((512, 512), 256, 512, 2) == ([(512, 512)], [])


def test_768x512_step128_min512() -> None:
    max_b, sub_b = make_buckets((768, 512), 128, 512, 2)
    assert max_b == [(512, 768), (512, 640), (512, 512), (640, 512), (768, 512)]
    assert sub_b == []


def test_768x512_step128_min384() -> None:
    max_b, sub_b = make_buckets((768, 512), 128, 384, 2)
    assert max_b == [(384, 768), (512, 768), (512, 640), (512, 512), (640, 512), (768, 512), (768, 384)]
    assert sub_b == [(384, 640), (384, 512), (384, 384), (512, 384), (640, 384)]


def test_768x512_step128_min256_readme_example() -> None:
    max_b, sub_b = make_buckets((768, 512), 128, 256, 2)
    assert len(max_b) == 7
    assert sub_b == [
        (256, 512), (384, 640), (256, 384), (384, 512), (384, 384),
        (256, 256), (512, 384), (384, 256), (640, 384), (512, 256),
    ]  # fmt: skip


def test_1024_step256_min512() -> None:
    max_b, sub_b = make_buckets((1024, 1024), 256, 512, 2)
    assert max_b == [(512, 1024), (768, 1024), (1024, 1024), (1024, 768), (1024, 512)]
    assert sub_b == [(512, 768), (768, 768), (512, 512), (768, 512)]


def test_1024_step128_min512() -> None:
    max_b, sub_b = make_buckets((1024, 1024), 128, 512, 2)
    tall = [(w, 1024) for w in range(512, 1025, 128)]
    assert sorted(max_b) == sorted(set(tall) | {(h, w) for w, h in tall})
    assert len(max_b) == 9 and len(sub_b) == 16


def test_image_size_order_does_not_matter_and_single_number() -> None:
    assert make_buckets((512, 768), 128, 384, 2) == make_buckets((768, 512), 128, 384, 2)
    assert make_buckets([512], 256, 512, 2) == make_buckets((512, 512), 256, 512, 2)


# --- edge settings -------------------------------------------------------------------


def test_step_zero_means_one_fixed_size() -> None:
    assert make_buckets((512, 512), 0, 512, 2) == ([(512, 512)], [])
    assert make_buckets((768, 512), 0, 256, 2) == ([(512, 768), (768, 512)], [])


def test_step_larger_than_short_side_does_not_divide_by_zero() -> None:
    max_b, sub_b = make_buckets((100, 100), 256, 64, 2)
    assert max_b == [(100, 100)] and sub_b == [(64, 64)]


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (((512, 512), -64, 512, 2), "image_buckets_step"),
        (((512, 512), 64, 0, 2), "image_min_length"),
        (((512, 512), 64, 512, 0.5), "image_max_ratio"),
        (((512, 512), 64, 512, float("nan")), "image_max_ratio"),
        (((0, 512), 64, 512, 2), "image_size"),
        (((512, 512, 3), 64, 512, 2), "image_size"),
    ],
)
def test_bad_settings_name_the_setting(args: tuple, setting: str) -> None:
    with pytest.raises(DataError, match=setting):
        make_buckets(*args)


# --- properties ----------------------------------------------------------------------

settings_cases = st.tuples(
    st.integers(1, 8).map(lambda k: 32 * k),  # step
    st.integers(1, 24),  # a / step
    st.integers(1, 24),  # b / step
    st.integers(1, 24),  # min / step
    st.sampled_from([1.0, 1.25, 1.5, 2.0, 3.0, 4.0]),
)


@settings(max_examples=150, deadline=None)
@given(settings_cases)
def test_bucket_properties(case: tuple[int, int, int, int, float]) -> None:
    step, ka, kb, km, ratio = case
    size, min_length = (ka * step, kb * step), km * step
    max_b, sub_b = make_buckets(size, step, min_length, ratio)
    a, b = sorted(size)
    assert (a, a) in max_b
    assert not set(max_b) & set(sub_b)
    for buckets in (max_b, sub_b):
        assert len(set(buckets)) == len(buckets)
        ratios = [w / h for w, h in buckets]
        assert ratios == sorted(ratios)
        for w, h in buckets:
            assert w % step == 0 and h % step == 0
            assert w * h <= a * b
            assert max(w, h) <= b
            assert (h, w) in buckets
            if (w, h) != (a, a):
                assert max(w, h) >= min_length  # the computed side may be shorter (original arithmetic)
                if buckets is sub_b:
                    assert min(w, h) >= min_length
                assert 1 / ratio - 1e-12 <= w / h <= ratio + 1e-12
    assert make_buckets(size, step, min_length, ratio) == (max_b, sub_b)


@settings(max_examples=100, deadline=None)
@given(settings_cases)
def test_sub_buckets_are_every_fitting_grid_size(case: tuple[int, int, int, int, float]) -> None:
    step, ka, kb, km, ratio = case
    size, min_length = (ka * step, kb * step), km * step
    max_b, sub_b = make_buckets(size, step, min_length, ratio)
    a, b = sorted(size)
    grid = range(min_length, b + 1, step)
    fitting = {(w, h) for w in grid for h in grid if w * h <= a * b and 1 / ratio <= w / h <= ratio}
    assert set(sub_b) == fitting - set(max_b)


# --- nearest bucket, sub picks ---------------------------------------------------------


def test_nearest_bucket_and_signed_error() -> None:
    max_b, _ = make_buckets((768, 512), 128, 384, 2)
    assert nearest_bucket((1000, 500), max_b) == ((768, 384), 0.0)
    bucket, error = nearest_bucket((600, 500), max_b)
    assert bucket == (640, 512) and error == pytest.approx(640 / 512 - 1.2)
    bucket, error = nearest_bucket((500, 1000), max_b)
    assert bucket == (384, 768) and error == 0.0
    with pytest.raises(DataError):
        nearest_bucket((10, 10), [])


def test_pick_sub_buckets_penalises_each_pick() -> None:
    _, sub_b = make_buckets((768, 512), 128, 256, 2)
    picks = pick_sub_buckets((300, 300), sub_b, 3)
    assert [bucket for bucket, _ in picks] == [(384, 384), (256, 256), (384, 512)]
    assert all(error == pytest.approx(w / h - 1.0) for (w, h), error in picks)
    repeated = pick_sub_buckets((300, 300), sub_b, len(sub_b) + 2)
    assert len(repeated) == len(sub_b) + 2
    assert {bucket for bucket, _ in repeated} <= set(sub_b)
    # (256, 512) has error -0.5; penalised once it is +0.5 and wins again before (512, 256) at 1.0
    assert [bucket for bucket, _ in repeated].count((256, 512)) == 2
    assert pick_sub_buckets((300, 300), [], 3) == []


# --- resize and crop -----------------------------------------------------------------


def _stripes(width: int, height: int) -> Image.Image:
    """Left third red, middle green, right third blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 3, 0] = 255
    array[:, width // 3 : 2 * width // 3, 1] = 255
    array[:, 2 * width // 3 :, 2] = 255
    return Image.fromarray(array)


def test_wide_image_matches_height_and_crops_centre() -> None:
    image = _stripes(900, 300)
    out = resize_and_crop(image, (128, 128), 1.0 - 3.0, False)
    assert out is not None and out.size == (128, 128)
    assert out.getpixel((64, 64))[1] > 200  # green centre kept
    assert out.getpixel((2, 64))[1] > 200 and out.getpixel((125, 64))[1] > 200  # red and blue cropped away


def test_tall_image_matches_width_and_crops_centre() -> None:
    image = _stripes(900, 300).transpose(getattr(Image, "Transpose", Image).ROTATE_90)  # 300 x 900
    assert image.size == (300, 900)
    out = resize_and_crop(image, (256, 384), 256 / 384 - 300 / 900, False)
    assert out is not None and out.size == (256, 384)
    assert out.getpixel((128, 192))[1] > 200


def test_exact_size_and_upscale() -> None:
    out = resize_and_crop(_stripes(30, 20), (64, 64), 1.0 - 1.5, False)
    assert out is not None and out.size == (64, 64)


def test_disable_upscale_refuses_small_images() -> None:
    small = _stripes(300, 200)
    assert resize_and_crop(small, (512, 512), 1.0 - 1.5, True) is None
    assert resize_and_crop(small, (128, 128), 1.0 - 1.5, True).size == (128, 128)
    tall = _stripes(200, 300)
    assert resize_and_crop(tall, (256, 256), 1.0 - 2 / 3, True) is None


def test_extreme_ratio_does_not_build_a_huge_intermediate() -> None:
    out = resize_and_crop(Image.new("RGB", (2, 4000), (9, 9, 9)), (512, 512), 1.0 - 2 / 4000, False)
    assert out is not None and out.size == (512, 512)


@pytest.mark.parametrize("size,bucket,error,box", [
    ((900, 300), (128, 128), -2.0, (300, 0, 600, 300)),  # wide: full height, centre
    ((901, 300), (128, 128), -2.0, (300, 0, 600, 300)),  # odd margin: whole pixels, rounded down
    ((300, 901), (256, 384), 0.3, (0, 225, 300, 675)),  # tall: full width, centre
    ((128, 64), (64, 32), 0.0, (0, 0, 128, 64)),  # same ratio: the whole image
    ((4000, 1), (64, 64), -3999.0, (1999, 0, 2000, 1)),  # a 1-pixel strip: at least 1 pixel kept
    ((1, 4000), (64, 64), 0.99, (0, 1999, 1, 2000)),
])
def test_crop_box_is_the_centred_largest_box_of_the_bucket_ratio(size, bucket, error, box) -> None:
    assert crop_box(size, bucket, error) == box
    assert all(isinstance(v, int) for v in crop_box(size, bucket, error))


def test_disable_upscale_allows_an_image_exactly_as_large_as_the_bucket() -> None:
    assert crop_box((600, 128), (128, 128), -3.0, True) == (236, 0, 364, 128)
    assert crop_box((128, 600), (128, 128), 0.5, True) == (0, 236, 128, 364)
    assert crop_box((600, 127), (128, 128), -3.0, True) is None and crop_box((127, 600), (128, 128), 0.5, True) is None
    assert crop_box((30, 20), (64, 64), -0.5) == (5, 0, 25, 20)  # upscaling is allowed unless disabled


def test_crop_offset_is_in_bucket_pixels() -> None:
    """SDXL's crop_coords_top_left: where the crop starts in the image resized to the bucket."""
    assert crop_offset((900, 300), (128, 128), (300, 0, 600, 300)) == (128, 0)
    assert crop_offset((300, 901), (256, 384), (0, 225, 300, 675)) == (0, 192)
    assert crop_offset((4000, 1), (64, 64), (1999, 0, 2000, 1)) == (127936, 0)
    assert crop_offset((1, 4000), (64, 64), (0, 1999, 1, 2000)) == (0, 127936)
    assert crop_offset((64, 64), (64, 64), (0, 0, 64, 64)) == (0, 0)


def test_equal_ratio_buckets_are_listed_largest_first_and_the_stated_bounds_are_accepted() -> None:
    _, sub = make_buckets((512, 512), 64, 64, 2.0)
    squares = [b for b in sub if b[0] == b[1]]
    assert squares == sorted(squares, reverse=True) and len(squares) > 3
    for a, b in zip(sub, sub[1:]):
        assert a[0] / a[1] < b[0] / b[1] or a[0] * a[1] > b[0] * b[1]
    # the errors say "positive whole numbers" and "whole number >= 1": 1 is allowed
    assert make_buckets((1,), 0, 1, 1.0) == ([(1, 1)], [])


def test_bucket_sides_are_whole_pixels_and_crop_offsets_use_each_axis() -> None:
    for size in [(512, 512), (768, 512), (640, 896)]:
        buckets, sub = make_buckets(size, 64, 192, 2.0)
        assert all(type(v) is int for b in buckets + sub for v in b)
    box = crop_box((900, 300), (192, 128), -2.0)
    assert box == (225, 0, 675, 300) and crop_offset((900, 300), (192, 128), box) == (96, 0)


def test_no_bucket_and_the_sub_bucket_penalty_are_as_documented() -> None:
    message = r"^There are no buckets to place images in; check image_size and image_min_length\.$"
    with pytest.raises(DataError, match=message):
        nearest_bucket((64, 64), [])
    # +1 per pick: the square (error 0 -> 1) wins again over a bucket 1.5 away
    assert [b for b, _ in pick_sub_buckets((100, 100), [(64, 64), (160, 64)], 2)] == [(64, 64), (64, 64)]
    assert [b for b, _ in pick_sub_buckets((100, 100), [(64, 64), (160, 64)], 1)] == [(64, 64)]
    assert pick_sub_buckets((100, 100), [(64, 64)], 0) == []


def test_resize_and_crop_scales_a_whole_image_with_lanczos() -> None:
    small = _stripes(32, 32)
    out = resize_and_crop(small, (64, 64), 0.0, False)  # no crop, but a different size: still resized
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(small.resize((64, 64), Image.LANCZOS)))
    wide = _stripes(90, 30)
    box = crop_box((90, 30), (64, 64), -2.0)
    want = wide.resize((64, 64), Image.LANCZOS, box=box)
    assert np.array_equal(np.asarray(resize_and_crop(wide, (64, 64), -2.0, False)), np.asarray(want))


@pytest.mark.parametrize("args,max_buckets,sub_buckets", [
    # 128x192 = 24576 px, step 128: width 192 (the long side itself) gives height 128, ratio 1.5 = the limit
    (((128, 192), 128, 64, 1.5), [(128, 192), (128, 128), (192, 128)], [(64, 64)]),
    # 64x192 = 12288 px: width 128 gives height 64 (12288 // 128 = 96, down to the step), ratio 2 = the limit
    (((64, 192), 64, 64, 2.0), [(64, 128), (64, 64), (128, 64)], []),
    # sub buckets may use the long side and exactly the whole pixel budget: 64 x 192 = 12288
    (((64, 192), 128, 64, 4.0), [(64, 128), (64, 64), (128, 64)], [(64, 192), (192, 64)]),
])
def test_bucket_limits_are_inclusive(args, max_buckets, sub_buckets) -> None:
    assert make_buckets(*args) == (max_buckets, sub_buckets)
