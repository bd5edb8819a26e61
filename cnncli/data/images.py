"""Decoding image files and converting uint8 images: channels (ITU-R 601 luma) and size (Pillow).

Pillow is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cnncli.errors import UserError

# Pillow modes that carry no colour; a folder of only these images loads as one channel.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})
UINT8_MAX, UINT16_MAX = 255, 65535

# ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B) in Pillow's 16-bit fixed point, so converting here
# gives exactly the bytes Pillow's convert("L") gives for the same image (folders decode through Pillow).
LUMA_WEIGHTS_16 = np.array([19595, 38470, 7471], dtype=np.uint32)
LUMA_SHIFT = 16
LUMA_ROUND = 1 << (LUMA_SHIFT - 1)
LUMA_CHUNK = 4096


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Convert uint8 NHWC images to `channels` (1 or 3): gray = ITU-R 601 luma, RGB = gray repeated."""
    have = x.shape[-1]
    if have == channels:
        return x
    if channels == 3 and have == 1:
        return np.repeat(x, 3, axis=-1)
    if channels == 1 and have == 3:
        # Chunked so a large colour dataset never needs a wide copy of itself.
        out = np.empty(x.shape[:-1] + (1,), np.uint8)
        for i in range(0, len(x), LUMA_CHUNK):
            rgb = x[i:i + LUMA_CHUNK].astype(np.uint32)
            luma = (rgb @ LUMA_WEIGHTS_16 + LUMA_ROUND) >> LUMA_SHIFT
            out[i:i + LUMA_CHUNK, ..., 0] = luma.astype(np.uint8)
        return out
    raise ValueError(f"cannot convert {have} channels to {channels}")


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one uint8 HWC image to (H, W) with Pillow's bilinear filter (antialiased when shrinking)."""
    from PIL import Image

    h, w = size
    if img.shape[:2] == (h, w):
        return img
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR)).reshape(h, w, img.shape[-1])


def resize_images(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 NHWC images to (H, W) as `resize_image` does."""
    h, w = size
    if x.shape[1:3] == (h, w):
        return x
    out = np.empty((len(x), h, w, x.shape[-1]), np.uint8)
    for i, img in enumerate(x):
        out[i] = resize_image(img, (h, w))
    return out


def decode_image(path: Path) -> np.ndarray:
    """Decode one image to uint8 (H, W, 1) if it is gray, else (H, W, 3)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return _to_array(img)
    except _decode_errors() as e:
        raise UserError(f"cannot read image {path}: {e}; delete or replace the file") from None


def decode_bytes(data: bytes, *, draft: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, ...) held in memory as `decode_image` decodes a file.

    `draft` (W, H): a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (Pillow's draft mode), the
    smallest of these still at least W x H; other formats ignore it.

    Raises:
        CorruptImage: The bytes are not a readable image.
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if draft is not None and img.format == "JPEG":
                img.draft("L" if img.mode in GRAY_MODES else "RGB", draft)
            return _to_array(img)
    except _decode_errors() as e:
        raise CorruptImage(str(e)) from None


class CorruptImage(Exception):
    """Encoded bytes that do not decode; the caller names the file or record."""


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError


def _to_array(img) -> np.ndarray:
    img.load()  # decode now, so a truncated file fails here and not later
    gray = img.mode in GRAY_MODES
    if img.mode in WIDE_GRAY_MODES:
        # 16-bit gray (e.g. PNG) maps 0..65535 onto 0..255; 32-bit modes holding 8-bit values stay as they are.
        a = np.asarray(img, dtype=np.float64)
        wide = img.mode.startswith("I;16") or (a.size and a.max() > UINT8_MAX)
        scale = UINT8_MAX / UINT16_MAX if wide else 1.0
        return np.clip(np.rint(a * scale), 0, UINT8_MAX).astype(np.uint8)[..., None]
    arr = np.asarray(img.convert("L" if gray else "RGB"))
    return arr[..., None] if gray else arr


def image_size(data: bytes) -> tuple[int, int]:
    """(H, W) of an encoded image, read from its header without decoding the pixels.

    Raises:
        CorruptImage: The bytes are not a readable image.
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size[1], img.size[0]
    except _decode_errors() as e:
        raise CorruptImage(str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# ImageNet-style crops (torchvision's RandomResizedCrop, and Resize + CenterCrop for evaluation)


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float], attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering `scale` of the area with aspect `ratio` (w/h).

    torchvision's RandomResizedCrop.get_params: the area fraction is uniform in `scale`, the log aspect
    ratio uniform in log(`ratio`); after `attempts` draws that do not fit, the largest central crop
    whose aspect ratio lies within `ratio`.
    """
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resize_shorter(h: int, w: int, size: tuple[int, int], crop_ratio: float) -> tuple[int, int]:
    """The (H, W) an image is resized to before a center crop of `size` that keeps `crop_ratio` of it.

    For a square `size` this is torchvision's Resize(floor(size / crop_ratio)): the shorter side
    becomes that length, the longer one int(length * long / short) (0.875: 224 -> 256, timm's crop_pct).
    """
    th, tw = (math.floor(s / crop_ratio) for s in size)
    if h * tw <= w * th:  # the height is the binding side
        return th, max(tw, th * w // h)
    return max(th, tw * h // w), tw


def center_crop(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The central `size` (H, W) of an HWC image, offsets rounded as torchvision's CenterCrop rounds them."""
    h, w = img.shape[:2]
    th, tw = size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img[top:top + th, left:left + tw]


def resized_crop(img: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop `box` (top, left, height, width) of a uint8 HWC image and resize it to `size` as `resize_image` does."""
    top, left, ch, cw = box
    return resize_image(img[top:top + ch, left:left + cw], size)
