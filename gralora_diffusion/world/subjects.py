"""`world-bench`'s subjects: objects the world never drew, each a class the world knows with a new
colour pattern or a changed shape (a striped ball, a two-tone bottle, a tall cone), drawn by code with
draw.py's renderer (its backgrounds and objects), deterministic per subject and image. Nothing is stored
as images: `instance_images` draws them again on every call.

Each subject has 5 instance images (on a plain background or a table, as product photos are), and
its evaluation prompts by role: the subject alone and on every background (fidelity, and
recontextualization), its class in other colours (prior preservation), and scenes of other objects
(drift: the base model's and the adapted model's images of them, same seeds)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .draw import BACKGROUND_PHRASES, BACKGROUNDS, COLOURS, DRAW, HELD_OUT, SIZE, _jitter, allowed, caption, draw_background, draw_object, triples

IDENTIFIER = "sks"
INSTANCE_IMAGES = 5
INSTANCE_BACKGROUNDS = ("plain", "table")  # the instance photos' settings; recontext asks for all five
PATTERNS = ("stripes", "vstripes", "dots", "top", "left")  # where the second colour goes
SHAPES = {"tall": (0.8, 1.35), "wide": (1.35, 0.75)}  # (x, y) stretch of the drawn object
PRIOR_PROMPTS, UNRELATED_PROMPTS = 2, 3


@dataclass(frozen=True)
class Subject:
    name: str  # folder name, e.g. "striped_ball"
    obj: str  # the class word the world knows
    colour: str  # body colour
    second: str | None = None  # the pattern's colour
    pattern: str | None = None  # one of PATTERNS
    shape: str | None = None  # one of SHAPES

    @property
    def is_world_scene(self) -> bool:
        """True when the world itself draws this: one flat colour, the usual shape, an allowed pair."""
        return self.pattern is None and self.shape is None and allowed(self.obj, self.colour)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {IDENTIFIER} {self.obj}"

    def render(self, index: int, background: str) -> Image.Image:
        """One picture of the subject on `background` at SIZE px; deterministic per (subject, index)."""
        rng = random.Random(f"{self.name}:{index}")  # str seeds hash with sha512: the same in every process
        image = draw_background(background, rng)
        s = rng.uniform(0.75, 1.05)
        sx, sy = SHAPES.get(self.shape, (1.0, 1.0))
        layer = Image.new("RGBA", (DRAW, DRAW), (0, 0, 0, 0))
        rgb = _jitter(COLOURS[self.colour], rng, 10)
        draw_object(ImageDraw.Draw(layer), self.obj, rgb, DRAW / 2, DRAW / 2, s, rng.random() < 0.5, rng.uniform(-0.3, 0.3))
        if self.pattern:
            layer = _paint_pattern(layer, rgb, COLOURS[self.second], self.pattern, s)
        if self.shape:
            layer = layer.resize((round(DRAW * sx), round(DRAW * sy)), Image.Resampling.BICUBIC)
        margin = 36 * s * max(sx, sy)
        cx, cy = rng.uniform(margin, DRAW - margin), rng.uniform(margin, DRAW - margin)
        image.paste(layer, (round(cx - layer.width / 2), round(cy - layer.height / 2)), layer)
        return image.resize((SIZE, SIZE), Image.Resampling.BOX)

    def instance_images(self, count: int = INSTANCE_IMAGES) -> list[Image.Image]:
        return [self.render(i, INSTANCE_BACKGROUNDS[i % len(INSTANCE_BACKGROUNDS)]) for i in range(count)]

    def prompts(self) -> dict[str, list[str]]:
        """Evaluation prompts by role: subject, recontext (one per background), prior, unrelated."""
        subject = f"{IDENTIFIER} {self.obj}"
        rng = random.Random(f"{self.name}:prompts")
        others = [c for c in COLOURS if c not in (self.colour, self.second) and allowed(self.obj, c)]
        scenes = sorted(t for t in triples() if t[0] != self.obj and t not in HELD_OUT)
        return {
            "subject": [f"a photo of {subject}"],
            "recontext": [f"a photo of {subject} on {BACKGROUND_PHRASES[b][0]}" for b in BACKGROUNDS],
            "prior": [caption(self.obj, c, None) for c in rng.sample(others, PRIOR_PROMPTS)],
            "unrelated": [caption(*t) for t in rng.sample(scenes, UNRELATED_PROMPTS)],
        }


def _paint_pattern(layer: Image.Image, body, second, pattern: str, s: float) -> Image.Image:
    """The object's body pixels (exactly its fill colour; outlines and highlights stay) in `second` where
    the pattern says so."""
    pixels = np.array(layer)
    y, x = np.mgrid[0:DRAW, 0:DRAW]
    period = max(6, round(12 * s))
    where = {
        "stripes": (y // (period // 2)) % 2 == 1,
        "vstripes": (x // (period // 2)) % 2 == 1,
        "dots": (x % period - period / 2) ** 2 + (y % period - period / 2) ** 2 < (period / 4) ** 2,
        "top": y < DRAW / 2,
        "left": x < DRAW / 2,
    }[pattern]
    is_body = (pixels[..., :3] == np.array(body, dtype=np.uint8)).all(-1) & (pixels[..., 3] > 0)
    pixels[where & is_body, :3] = second
    return Image.fromarray(pixels, "RGBA")


SUBJECTS = (
    Subject("striped_ball", "ball", "red", "white", "stripes"),
    Subject("two_tone_bottle", "bottle", "blue", "yellow", "top"),
    Subject("dotted_cube", "cube", "green", "white", "dots"),
    Subject("tall_cone", "cone", "orange", shape="tall"),
    Subject("wide_heart", "heart", "purple", shape="wide"),
    Subject("half_star", "star", "yellow", "red", "left"),
    Subject("tall_ring", "ring", "green", shape="tall"),
    Subject("red_teapot", "teapot", "red"),  # the samples' colour: the world's teapot is never red
    Subject("striped_bottle", "bottle", "black", "white", "vstripes"),
    Subject("dotted_ball", "ball", "blue", "yellow", "dots"),
)


def subjects(count: int | None = None) -> list[Subject]:
    """The first `count` subjects (all when None)."""
    return list(SUBJECTS if count is None else SUBJECTS[:count])
