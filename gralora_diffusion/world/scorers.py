"""The world evaluator as `evaluate` / `compare` scorers (registered in evaluate.BASE_SCORERS for the
`world` base): DreamBooth's subject fidelity with the evaluator's embedding standing in for DINO, on
the prompts that name the subject; the requested background recognized (recontextualization); and
the object and colour of prompts without the subject recognized (prior preservation). A toy world's
numbers: they show the method working, not SDXL quality."""

from __future__ import annotations

import re

from ..metrics import mean_pairwise_cosine
from .draw import BACKGROUND_PHRASES, COLOURS, OBJECTS
from .evaluator import WorldEvaluator


def requested(prompt: str) -> dict[str, str]:
    """What a world prompt asks for: {'object', 'colour', 'background'} as far as it names them."""
    text = prompt.lower()
    want = {}
    on = text.rsplit(" on ", 1)
    thing, place = on[0], on[1] if len(on) == 2 else ""
    for name, phrases in BACKGROUND_PHRASES.items():
        if place and any(place.strip().endswith(p) for p in phrases):
            want["background"] = name
    words = re.findall(r"[a-z]+", thing)
    want |= {"object": w for w in words if w in OBJECTS}
    want |= {"colour": w for w in words if w in COLOURS}
    return want


class WorldScorer:
    """scorer(images, prompts) -> world_fidelity, world_background, world_prior (each only when some
    prompt asks for it). `identifier` marks the subject's prompts ('sks' in 'a photo of sks teapot')."""

    def __init__(self, instance_images, identifier: str = "sks", evaluator: WorldEvaluator | None = None):
        self.evaluator = evaluator or WorldEvaluator.load()
        self.identifier = identifier
        self.reference = self.evaluator.embed(list(instance_images))

    def __call__(self, images, prompts) -> dict:
        images, prompts = list(images), list(prompts)
        predicted = self.evaluator.predict(images)
        subject = [i for i, p in enumerate(prompts) if self.identifier in p.split()]
        out = {}
        if subject:
            out["world_fidelity"] = mean_pairwise_cosine(self.evaluator.embed([images[i] for i in subject]), self.reference)
        asked = [(i, requested(p)) for i, p in enumerate(prompts)]
        background = [predicted[i]["background"] == want["background"] for i, want in asked if "background" in want]
        if background:
            out["world_background"] = sum(background) / len(background)
        prior = [all(predicted[i][k] == want[k] for k in ("object", "colour")) for i, want in asked
                 if i not in subject and "object" in want and "colour" in want]
        if prior:
            out["world_prior"] = sum(prior) / len(prior)
        return out


def world_scorers(instance_images, device=None) -> list:
    """evaluate.BASE_SCORERS["world"]: the world evaluator's scorer (it runs on the CPU: it is tiny)."""
    return [WorldScorer(instance_images)]
