"""ImageNet-style crops of the streaming path, against torchvision's documented behaviour and Pillow."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from cnncli.data.images import (
    CorruptImage,
    center_crop,
    decode_bytes,
    random_resized_crop_box,
    resize_image,
    resize_shorter,
    resized_crop,
)

IMAGENET_SCALE, IMAGENET_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def test_random_resized_crop_stays_inside_and_follows_its_ranges():
    rng = np.random.default_rng(0)
    for h, w in [(375, 500), (500, 375), (64, 64), (3, 200)]:
        for _ in range(300):
            top, left, ch, cw = random_resized_crop_box(h, w, rng, IMAGENET_SCALE, IMAGENET_RATIO)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1


def test_random_resized_crop_distribution():
    """Where no draw is rejected, the area fraction is uniform in scale and log(w/h) uniform in log(ratio)."""
    rng = np.random.default_rng(1)
    scale, ratio = (0.08, 0.5), IMAGENET_RATIO  # on 512x512 every such crop fits: no rejection bias
    boxes = np.array([random_resized_crop_box(512, 512, rng, scale, ratio) for _ in range(4000)])
    area = boxes[:, 2] * boxes[:, 3] / 512**2
    log_ratio = np.log(boxes[:, 3] / boxes[:, 2])
    assert stats.kstest(area, stats.uniform(scale[0], scale[1] - scale[0]).cdf).pvalue > 1e-3
    lo, hi = np.log(ratio)
    assert stats.kstest(log_ratio, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    # offsets: uniform over every position the crop fits in, ends included (torch.randint(0, h - ch + 1))
    fixed = [random_resized_crop_box(100, 100, rng, (0.5, 0.5), (1, 1)) for _ in range(3000)]
    assert {b[2:] for b in fixed} == {(71, 71)}  # round(sqrt(5000))
    tops = [b[0] for b in fixed]
    assert min(tops) == 0 and max(tops) == 29


def test_random_resized_crop_falls_back_to_the_central_crop():
    # torchvision: after 10 misses, in_ratio > max(ratio) -> h = height, w = round(h * max(ratio)), centred
    rng = np.random.default_rng(2)
    assert random_resized_crop_box(10, 1000, rng, (0.9, 1.0), IMAGENET_RATIO) == (0, 493, 10, 13)
    assert random_resized_crop_box(1000, 10, rng, (0.9, 1.0), IMAGENET_RATIO) == (493, 0, 13, 10)  # w / min(ratio)
    assert random_resized_crop_box(50, 60, rng, (1.0, 1.0), (10.0, 20.0)) == (22, 0, 6, 60)


@pytest.mark.parametrize(("h", "w", "expected"), [
    (375, 500, (256, 341)),  # torchvision Resize(256): the long side int(256 * 500 / 375)
    (500, 375, (341, 256)),
    (256, 256, (256, 256)),
    (1000, 257, (996, 256)),
])
def test_resize_shorter_matches_torchvision_resize(h, w, expected):
    assert resize_shorter(h, w, (224, 224), 0.875) == expected


def test_eval_transform_is_pillow_resize_then_center_crop():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    out = center_crop(resize_image(img, resize_shorter(375, 500, (224, 224), 0.875)), (224, 224))
    # torchvision on a PIL image: Resize(256) = PIL bilinear to 341x256, CenterCrop(224): top round(16), left
    # round(58.5) = 58
    ref = np.asarray(Image.fromarray(img).resize((341, 256), Image.Resampling.BILINEAR))[16:240, 58:282]
    np.testing.assert_array_equal(out, ref)


def test_resized_crop_is_pillow_crop_then_resize():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    out = resized_crop(img, (5, 7, 30, 50), (24, 24))
    ref = np.asarray(Image.fromarray(img).crop((7, 5, 57, 35)).resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, ref)


def test_jpeg_draft_decodes_at_the_smallest_scale_that_covers_the_request():
    img = np.random.default_rng(5).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG")
    data = buffer.getvalue()
    assert decode_bytes(data).shape == (600, 800, 3)
    assert decode_bytes(data, draft=(100, 100)).shape == (150, 200, 3)  # 1/8 would be 75 high: too small
    assert decode_bytes(data, draft=(800, 600)).shape == (600, 800, 3)
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    assert decode_bytes(png.getvalue(), draft=(100, 100)).shape == (600, 800, 3)  # only JPEG has a draft mode
    with pytest.raises(CorruptImage):
        decode_bytes(data[: len(data) // 3])
