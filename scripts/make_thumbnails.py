"""Template-browser thumbnails for the example workflows (workflows/ui/<title>.jpg).

No model weights exist offline, so the pictures are drawn: one scene (a lighthouse on a cliff at sunset,
the examples' prompt) rendered at several qualities with the degradations the paper's low targets give
(blur, noise, JPEG artefacts, dull colours). They illustrate what an example does; they print no scores
(a drawn scene is not a photo, and no-reference metrics would judge the drawing, not the idea).

    python -m comfyui_iqa_adapter.scripts.workflow_tools thumbnails
"""
from __future__ import annotations

import io
import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

SIZE = (480, 360)       # the card shows a 4:3 crop
MAX_BYTES = 100 * 1024


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def scene(width: int, height: int) -> Image.Image:
    """The lighthouse at sunset, drawn crisply."""
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = np.array([70, 40, 120]), np.array([250, 150, 70])
    sky = (top + (bottom - top) * y).repeat(width, axis=1)
    image = Image.fromarray(sky.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.62)
    sun = (int(width * 0.68), int(height * 0.55))
    draw.ellipse([sun[0] - height // 8, sun[1] - height // 8, sun[0] + height // 8, sun[1] + height // 8],
                 fill=(255, 210, 110))
    draw.rectangle([0, horizon, width, height], fill=(30, 60, 110))
    for row in range(horizon + 4, height, 7):  # waves and the sun's glitter
        for x in range(0, width, 23):
            shift = (row * 7) % 23
            shade = (250, 190, 120) if abs(x - sun[0]) < width * 0.12 else (70, 110, 170)
            draw.line([x + shift, row, x + shift + 10, row], fill=shade, width=1)
    cliff = [(0, height), (0, int(height * 0.48)), (int(width * 0.18), int(height * 0.45)),
             (int(width * 0.36), int(height * 0.58)), (int(width * 0.44), height)]
    draw.polygon(cliff, fill=(45, 35, 40))
    base_x, base_y = int(width * 0.14), int(height * 0.46)
    tower_h, tower_w = int(height * 0.30), int(width * 0.05)
    for band in range(5):  # red and white stripes
        y0 = base_y - tower_h + band * tower_h // 5
        taper = band * tower_w // 10
        inset = (5 - band) * 2 - taper // 3
        draw.rectangle([base_x - tower_w + inset, y0, base_x + tower_w - inset, y0 + tower_h // 5],
                       fill=(200, 40, 40) if band % 2 else (240, 240, 235))
    lamp_y = base_y - tower_h
    draw.rectangle([base_x - tower_w // 2, lamp_y - tower_w, base_x + tower_w // 2, lamp_y], fill=(255, 240, 160))
    draw.polygon([(base_x - tower_w, lamp_y - tower_w), (base_x + tower_w, lamp_y - tower_w),
                  (base_x, lamp_y - 2 * tower_w)], fill=(60, 30, 30))
    draw.polygon([(base_x, lamp_y - tower_w // 2), (width, lamp_y - tower_w * 3), (width, lamp_y + tower_w * 2)],
                 fill=(255, 235, 170))
    return image.filter(ImageFilter.SMOOTH)


def degrade(image: Image.Image, quality: float, seed: int = 0) -> Image.Image:
    """quality 1 = as drawn; 0 = what a 1st-percentile target looks like (blurred, noisy, blocky, dull)."""
    bad = 1.0 - quality
    out = image.filter(ImageFilter.GaussianBlur(radius=4.0 * bad))
    out = ImageEnhance.Color(out).enhance(1.0 - 0.6 * bad)
    array = np.asarray(out, dtype=np.float32)
    array += np.random.default_rng(seed).normal(0.0, 40.0 * bad, array.shape)
    out = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=int(8 + 87 * quality))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def oversharpen(image: Image.Image) -> Image.Image:
    """What strong gradient guidance tends to add: metric-pleasing high-frequency texture."""
    out = image.filter(ImageFilter.UnsharpMask(radius=3, percent=260, threshold=0))
    return ImageEnhance.Contrast(out).enhance(1.25)


def _label(draw: ImageDraw.ImageDraw, xy, text: str, size: int = 15) -> None:
    font = _font(size)
    box = draw.multiline_textbbox(xy, text, font=font, spacing=2)
    draw.rectangle([box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3], fill=(0, 0, 0))
    draw.multiline_text(xy, text, fill=(255, 255, 255), font=font, spacing=2)


def _panels(images: list[Image.Image], labels: list[str], title: str) -> Image.Image:
    width, height = SIZE
    canvas = Image.new("RGB", SIZE, (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    gap, top = 6, 44
    panel_w = (width - gap * (len(images) + 1)) // len(images)
    panel_h = height - top - gap
    for i, (image, label) in enumerate(zip(images, labels)):
        x = gap + i * (panel_w + gap)
        canvas.paste(ImageOps.fit(image, (panel_w, panel_h), Image.BILINEAR, centering=(0.1, 0.5)), (x, top))
        _label(draw, (x + 6, top + panel_h - 40), label, 13)
    draw.text((10, 10), title, fill=(255, 255, 255), font=_font(20))
    return canvas


def _single(image: Image.Image, label: str, title: str) -> Image.Image:
    canvas = image.resize(SIZE, Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    _label(draw, (12, 12), title, 20)
    _label(draw, (12, SIZE[1] - 48), label, 15)
    return canvas


def build(slug: str) -> Image.Image:
    base = scene(640, 480)
    if slug in ("sdxl_quality_target", "sd15_quality_target"):
        model = "SDXL" if slug.startswith("sdxl") else "SD1.5"
        low = degrade(base, 0.0, seed=1)
        return _panels([low, base], ["target p1", "target p99"], f"{model} at a chosen quality")
    if slug == "degradation_sweep":
        levels = [(1, 0.0), (25, 0.45), (50, 0.65), (75, 0.82), (99, 1.0)]
        images = [degrade(base, q, seed=p) for p, q in levels]
        return _panels(images, [f"p{p}" for p, _ in levels], "Quality sweep, worst to best")
    if slug == "reference_transfer":
        reference = scene(640, 480).transpose(Image.FLIP_LEFT_RIGHT).filter(ImageFilter.BoxBlur(6))
        reference = ImageEnhance.Color(reference).enhance(0.4)
        result = ImageEnhance.Color(base.filter(ImageFilter.BoxBlur(6))).enhance(0.4)
        return _panels([reference, base, result], ["quality\nreference", "your\nimage", "re-\nrendered"],
                       "Copy a reference's quality (img2img)")
    if slug == "gradient_guidance":
        adapter_only = degrade(base, 0.8, seed=3)
        return _panels([adapter_only, oversharpen(adapter_only)], ["adapter", "+ gradient\nguidance"],
                       "Gradient quality guidance")
    if slug == "score_images":
        return _panels([base, degrade(base, 0.2, seed=5)], ["score 1", "score 2"], "Score your images")
    raise KeyError(slug)


def save_small(image: Image.Image, path: pathlib.Path) -> pathlib.Path:
    for quality in (85, 75, 65, 55):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, optimize=True, progressive=True)
        if buffer.tell() <= MAX_BYTES:
            break
    path.write_bytes(buffer.getvalue())
    return path


def write_thumbnails(paths: dict[str, pathlib.Path]) -> list[pathlib.Path]:
    return [save_small(build(slug), path) for slug, path in paths.items()]


if __name__ == "__main__":
    from comfyui_iqa_adapter.scripts.workflow_tools import examples, thumbnail_path

    for written in write_thumbnails({name: thumbnail_path(ui) for name, ui in examples().items()}):
        print(written, math.ceil(written.stat().st_size / 1024), "KB")
