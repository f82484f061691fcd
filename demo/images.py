"""Product images of the demo catalog, drawn so that even a random-weight ViT keeps the signal.

A random network keeps what dominates the pixels, so category and style are written in large,
saturated areas rather than fine detail: the background is the category's colour, the foreground
is the style's shape (circle, square, triangle or stripes) in the style's tone at the style's place
in the frame. Small per-item touches (hue jitter, offsets, a few dots) make every image distinct.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageDraw

from demo.vocabulary import STYLES, category_hue

# Foreground tone per style: light, dark, mid and light-on-dark, so styles differ in luminance too.
_STYLE_TONES = ((248, 248, 248), (22, 22, 22), (128, 128, 128), (248, 248, 248))


def draw_item_image(
    category: int, style: int, n_categories: int, size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw one ``size`` x ``size`` RGB product image for an item of (category, style)."""
    hue = (category_hue(category, n_categories) + rng.uniform(-0.02, 0.02)) % 1.0
    value = rng.uniform(0.8, 0.95)
    background = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.85, value))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    tone = _STYLE_TONES[style % len(_STYLE_TONES)]
    shape = STYLES[style % len(STYLES)].shape
    s = size
    jx, jy = (int(v) for v in rng.integers(-s // 16, s // 16 + 1, size=2))
    if shape == "circle":  # centred disc
        r = int(s * rng.uniform(0.28, 0.34))
        cx, cy = s // 2 + jx, s // 2 + jy
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tone)
    elif shape == "square":  # block in the upper left
        side = int(s * rng.uniform(0.5, 0.58))
        x0, y0 = s // 10 + max(jx, 0), s // 10 + max(jy, 0)
        draw.rectangle((x0, y0, x0 + side, y0 + side), fill=tone)
    elif shape == "triangle":  # wide triangle standing on the bottom edge
        half = int(s * rng.uniform(0.36, 0.44))
        cx, top = s // 2 + jx, int(s * 0.18) + max(jy, 0)
        draw.polygon([(cx - half, s - 1), (cx + half, s - 1), (cx, top)], fill=tone)
    else:  # horizontal stripes over the whole frame
        period = max(4, s // 6)
        offset = int(rng.integers(0, period // 2 + 1))
        for y in range(offset - period, s, period):
            draw.rectangle((0, y, s - 1, y + period // 2 - 1), fill=tone)
    for _ in range(int(rng.integers(2, 5))):  # item-specific dots
        x, y = (int(v) for v in rng.integers(0, s, size=2))
        d = max(2, s // 16)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.ellipse((x, y, x + d, y + d), fill=colour)
    return img


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """Encode to JPEG or PNG bytes with fixed settings, so the same image gives the same bytes."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=90, optimize=False, progressive=False, subsampling=0)
    elif fmt == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        raise ValueError(f"unknown image format {fmt!r} (expected 'jpg' or 'png')")
    return buf.getvalue()


def truncate_jpeg(data: bytes) -> bytes:
    """Cut a JPEG halfway through its scan data, like a download that broke off.

    The header stays intact, so ``Image.open`` succeeds and only decoding the pixels fails
    ("image file is truncated"): the harder case for a pipeline, which must decode to notice.
    """
    sos = data.find(b"\xff\xda")
    if sos < 0:
        raise ValueError("not a baseline JPEG: no start-of-scan marker")
    return data[: sos + (len(data) - sos) // 2]
