"""The quickstart's subject: five 128x128 pictures of one red teapot (spout, handle, lid, dark base) in
different places, sizes and backgrounds, drawn with PIL. samples/ in the repository holds these five
files (`scripts/make_samples.py` writes them); an installed wheel has no samples/, so the quickstart
draws them here, the same pixels (tests/test_wheel.py checks both)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
# (background kind, background colours, teapot centre x, y, scale, mirrored)
SCENES = [
    ("plain", [(235, 228, 210)], 64, 70, 1.0, False),
    ("gradient", [(120, 170, 220), (230, 240, 250)], 44, 60, 0.8, False),
    ("stripes", [(90, 140, 90), (120, 170, 110)], 80, 78, 0.9, True),
    ("table", [(250, 245, 235), (140, 95, 60)], 64, 66, 1.2, False),
    ("checks", [(60, 60, 80), (90, 90, 110)], 70, 52, 0.7, True),
]
BODY, LID, SHADE = (200, 40, 40), (150, 25, 25), (120, 20, 20)


def background(kind, colours):
    image = Image.new("RGB", (SIZE, SIZE), colours[0])
    draw = ImageDraw.Draw(image)
    if kind == "gradient":
        (r0, g0, b0), (r1, g1, b1) = colours
        for y in range(SIZE):
            t = y / (SIZE - 1)
            draw.line([(0, y), (SIZE, y)], fill=(round(r0 + (r1 - r0) * t), round(g0 + (g1 - g0) * t), round(b0 + (b1 - b0) * t)))
    elif kind == "stripes":
        for x in range(0, SIZE, 16):
            draw.rectangle([x, 0, x + 7, SIZE], fill=colours[1])
    elif kind == "table":
        draw.rectangle([0, 92, SIZE, SIZE], fill=colours[1])
    elif kind == "checks":
        for y in range(0, SIZE, 16):
            for x in range((y // 16 % 2) * 16, SIZE, 32):
                draw.rectangle([x, y, x + 15, y + 15], fill=colours[1])
    return image


def teapot(draw, cx, cy, s, mirrored):
    def pt(x, y):  # teapot coordinates (body centre at 0, 0; spout to +x) -> image
        return (cx + (-x if mirrored else x) * s, cy + y * s)

    def box(x0, y0, x1, y1):
        (ax, ay), (bx, by) = pt(x0, y0), pt(x1, y1)
        return [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]

    draw.polygon([pt(18, 4), pt(40, -18), pt(44, -16), pt(24, 12)], fill=BODY)  # spout
    draw.ellipse(box(-40, -16, -16, 14), outline=BODY, width=max(2, round(5 * s)))  # handle
    draw.ellipse(box(-28, -24, 28, 26), fill=BODY)  # body
    draw.chord(box(-18, -32, 18, -14), 180, 360, fill=LID)  # lid
    draw.ellipse(box(-4, -37, 4, -29), fill=LID)  # knob
    draw.ellipse(box(-20, 20, 20, 30), fill=SHADE)  # base


def draw_samples(folder) -> list[Path]:
    """Write teapot_0.png ... teapot_4.png into `folder` (created); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (kind, colours, cx, cy, s, mirrored) in enumerate(SCENES):
        image = background(kind, colours)
        teapot(ImageDraw.Draw(image), cx, cy, s, mirrored)
        paths.append(folder / f"teapot_{i}.png")
        image.save(paths[-1])
    return paths
