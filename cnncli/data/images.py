"""Decoding image files and converting uint8 images: channels (ITU-R 601 luma) and size (Pillow).

Pillow is imported inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            gray = img.mode in GRAY_MODES
            if img.mode in WIDE_GRAY_MODES:
                # 16-bit gray (e.g. PNG) maps 0..65535 onto 0..255; 32-bit modes holding 8-bit values stay as they are.
                a = np.asarray(img, dtype=np.float64)
                wide = img.mode.startswith("I;16") or (a.size and a.max() > UINT8_MAX)
                scale = UINT8_MAX / UINT16_MAX if wide else 1.0
                return np.clip(np.rint(a * scale), 0, UINT8_MAX).astype(np.uint8)[..., None]
            arr = np.asarray(img.convert("L" if gray else "RGB"))
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; delete or replace the file") from None
    return arr[..., None] if gray else arr


