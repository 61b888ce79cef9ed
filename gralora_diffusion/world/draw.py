"""The tiny world: flat objects of 8 kinds and 8 colours on 5 backgrounds, drawn with PIL.

Drawn at 128 px and box-downsampled to `SIZE` (64 px), deterministic per (seed, index). The
world's teapot is never red and is shaped unlike samples/' teapot (no dark base, a flat lid, a
square handle), so `sks teapot` is a new instance of a known class, as in DreamBooth.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # the world's resolution
DRAW = 128  # drawn at this size, then box-downsampled
OBJECTS = ("teapot", "ball", "cube", "star", "cone", "ring", "heart", "bottle")
COLOURS = {
    "red": (205, 40, 40), "green": (40, 160, 60), "blue": (45, 75, 210), "yellow": (235, 205, 40),
    "orange": (240, 130, 30), "purple": (130, 50, 170), "white": (245, 245, 245), "black": (30, 30, 30),
}
BACKGROUNDS = ("plain", "sky", "stripes", "checks", "table")
# How captions name a background (the first is the canonical phrase used for evaluation prompts).
BACKGROUND_PHRASES = {
    "plain": ("a plain background", "plain"),
    "sky": ("sky", "the sky"),
    "stripes": ("green stripes", "stripes"),
    "checks": ("checks", "grey checks"),
    "table": ("a table", "the table"),
}
TEMPLATES = ("a photo of {thing}", "a picture of {thing}", "{thing}", "a drawing of {thing}")


def allowed(obj: str, colour: str) -> bool:
    """The world has every pair but red teapots: those are the samples' subject."""
    return not (obj == "teapot" and colour == "red")


def caption(obj: str, colour: str, background: str | None, rng: random.Random | None = None) -> str:
    """'a photo of a red ball on green stripes'; with `rng`, a random phrasing of the same scene."""
    article = "an" if colour[0] in "aeiou" else "a"
    template = TEMPLATES[0] if rng is None else rng.choice(TEMPLATES)
    text = template.format(thing=f"{article} {colour} {obj}")
    if background is not None:
        phrases = BACKGROUND_PHRASES[background]
        text += " on " + (phrases[0] if rng is None else rng.choice(phrases))
    return text


def _jitter(rgb, rng, amount=12):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _shade(rgb, f):
    return tuple(max(0, min(255, round(c * f))) for c in rgb)


def draw_background(kind: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (DRAW, DRAW))
    d = ImageDraw.Draw(image)
    if kind == "plain":
        d.rectangle([0, 0, DRAW, DRAW], fill=_jitter((228, 222, 205), rng, 15))
    elif kind == "sky":
        (r0, g0, b0), (r1, g1, b1) = _jitter((115, 165, 220), rng), _jitter((228, 238, 250), rng, 6)
        for y in range(DRAW):
            t = y / (DRAW - 1)
            d.line([(0, y), (DRAW, y)], fill=(round(r0 + (r1 - r0) * t), round(g0 + (g1 - g0) * t), round(b0 + (b1 - b0) * t)))
    elif kind == "stripes":
        base, stripe = _jitter((90, 140, 90), rng), _jitter((125, 175, 115), rng)
        d.rectangle([0, 0, DRAW, DRAW], fill=base)
        for x in range(rng.randint(0, 15) - 16, DRAW, 16):
            d.rectangle([x, 0, x + 7, DRAW], fill=stripe)
    elif kind == "checks":
        dark, light = _jitter((62, 62, 80), rng), _jitter((100, 100, 118), rng)
        d.rectangle([0, 0, DRAW, DRAW], fill=dark)
        for y in range(0, DRAW, 16):
            for x in range((y // 16 % 2) * 16, DRAW, 32):
                d.rectangle([x, y, x + 15, y + 15], fill=light)
    elif kind == "table":
        d.rectangle([0, 0, DRAW, DRAW], fill=_jitter((246, 240, 228), rng, 8))
        d.rectangle([0, rng.randint(84, 98), DRAW, DRAW], fill=_jitter((140, 95, 60), rng))
    else:
        raise ValueError(f"background {kind!r}: pick one of {', '.join(BACKGROUNDS)}")
    return image


def draw_object(d: ImageDraw.ImageDraw, obj: str, rgb, cx: float, cy: float, s: float, flip: bool, turn: float):
    """One object, body centred at (cx, cy), about 60*s px across; `flip` mirrors, `turn` rotates (radians)."""
    dark, light = _shade(rgb, 0.62), tuple(min(255, c + 60) for c in rgb)
    if rgb == COLOURS["black"]:
        dark, light = (75, 75, 75), (85, 85, 85)
    cos, sin = math.cos(turn), math.sin(turn)

    def pt(x, y):
        x = -x if flip else x
        return (cx + (x * cos - y * sin) * s, cy + (x * sin + y * cos) * s)

    def box(x0, y0, x1, y1):
        return [cx + x0 * s, cy + y0 * s, cx + x1 * s, cy + y1 * s]

    w = max(2, round(3 * s))
    if obj == "ball":
        d.ellipse(box(-28, -28, 28, 28), fill=rgb, outline=dark, width=w)
        d.ellipse(box(-16, -18, -4, -6), fill=light)
    elif obj == "cube":
        front = [pt(-22, -14), pt(14, -14), pt(14, 24), pt(-22, 24)]
        top = [pt(-22, -14), pt(-8, -28), pt(28, -28), pt(14, -14)]
        side = [pt(14, -14), pt(28, -28), pt(28, 10), pt(14, 24)]
        d.polygon(front, fill=rgb, outline=dark)
        d.polygon(top, fill=light, outline=dark)
        d.polygon(side, fill=dark, outline=dark)
    elif obj == "star":
        points = [pt(*(r * math.sin(a), -r * math.cos(a))) for i in range(10)
                  for a, r in [(i * math.pi / 5, 32 if i % 2 == 0 else 13)]]
        d.polygon(points, fill=rgb, outline=dark, width=w)
    elif obj == "cone":
        d.ellipse(box(-24, 18, 24, 32), fill=dark)
        d.polygon([pt(0, -32), pt(-24, 25), pt(24, 25)], fill=rgb)
    elif obj == "ring":
        d.ellipse(box(-30, -30, 30, 30), outline=dark, width=max(3, round(16 * s)))
        d.ellipse(box(-28, -28, 28, 28), outline=rgb, width=max(2, round(12 * s)))
    elif obj == "heart":
        d.ellipse(box(-28, -26, 2, 4), fill=rgb)
        d.ellipse(box(-2, -26, 28, 4), fill=rgb)
        d.polygon([pt(-27, -6), pt(27, -6), pt(0, 28)], fill=rgb)
    elif obj == "bottle":
        d.rounded_rectangle(box(-14, -6, 14, 32), radius=round(6 * s), fill=rgb, outline=dark, width=w)
        d.rectangle(box(-6, -28, 6, -6), fill=rgb, outline=dark, width=w)
        d.rectangle(box(-8, -34, 8, -27), fill=dark)
    elif obj == "teapot":  # the world's teapot: wide body, flat lid, square handle, no base
        d.polygon([pt(20, 2), pt(38, -20), pt(42, -17), pt(26, 12)], fill=rgb)
        d.rectangle([min(pt(-42, -12)[0], pt(-22, 12)[0]), cy - 12 * s, max(pt(-42, -12)[0], pt(-22, 12)[0]), cy + 12 * s],
                    outline=rgb, width=max(2, round(5 * s)))
        d.ellipse(box(-30, -18, 30, 24), fill=rgb, outline=dark, width=w)
        d.rectangle(box(-16, -26, 16, -18), fill=dark)
    else:
        raise ValueError(f"object {obj!r}: pick one of {', '.join(OBJECTS)}")


def render(seed: int, index: int, obj: str | None = None, colour: str | None = None, background: str | None = None):
    """One picture of the world -> (PIL image at SIZE px, labels dict, random caption). Deterministic
    for (seed, index); `obj` / `colour` / `background` fix those parts, the rest is drawn at random."""
    if obj and colour and not allowed(obj, colour):
        raise ValueError(f"render: the world has no {colour} {obj} (that is the samples' subject)")
    rng = random.Random(seed * 1_000_003 + index)
    while True:
        o = obj or rng.choice(OBJECTS)
        c = colour or rng.choice(list(COLOURS))
        if allowed(o, c):
            break
    b = background or rng.choice(BACKGROUNDS)
    image = draw_background(b, rng)
    s = rng.uniform(0.75, 1.2)
    margin = 36 * s
    cx, cy = rng.uniform(margin, DRAW - margin), rng.uniform(margin, DRAW - margin)
    draw_object(ImageDraw.Draw(image), o, _jitter(COLOURS[c], rng, 10), cx, cy, s, rng.random() < 0.5, rng.uniform(-0.3, 0.3))
    image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    label = {"object": o, "colour": c, "background": b}
    text = caption(o, c, None if rng.random() < 0.25 else b, rng)
    return image, label, text


def render_batch(seed: int, start: int, count: int):
    """`count` renders from index `start` -> (uint8 array N x 3 x SIZE x SIZE, label index array N x 3, captions)."""
    images, labels, texts = [], [], []
    colour_names = list(COLOURS)
    for i in range(start, start + count):
        image, label, text = render(seed, i)
        images.append(np.asarray(image).transpose(2, 0, 1))
        labels.append((OBJECTS.index(label["object"]), colour_names.index(label["colour"]), BACKGROUNDS.index(label["background"])))
        texts.append(text)
    return np.stack(images), np.array(labels, dtype=np.int64), texts


def triples() -> list[tuple[str, str, str]]:
    """Every (object, colour, background) the world has."""
    return [(o, c, b) for o in OBJECTS for c in COLOURS for b in BACKGROUNDS if allowed(o, c)]


# 40 scenes the UNet never sees: the base model's prompt following is measured on them.
HELD_OUT = frozenset(random.Random(0).sample(triples(), 40))
