"""Measurements on the world model with the world evaluator: the base model's prompt following, and
the quickstart's subject fidelity, recontextualization and prior preservation (DreamBooth's metrics,
with the evaluator's embedding standing in for DINO)."""

from __future__ import annotations

import torch

from .draw import HELD_OUT, caption
from .evaluator import WorldEvaluator, fidelity

STEPS, GUIDANCE = 20, 5.0


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = STEPS, guidance: float = GUIDANCE, chunk: int = 16):
    """One image per (prompt, seed) pair, each from its own seeded generator (same seed, same noise)."""
    images = []
    for i in range(0, len(prompts), chunk):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + chunk]]
        images += pipe(prompt=prompts[i:i + chunk], generator=gens, num_inference_steps=steps, guidance_scale=guidance).images
    return images


def held_out_pairs(seeds=(0, 1)) -> list[tuple[str, dict, int]]:
    """(prompt, wanted labels, seed) for every held-out scene x seed: 40 x 2 = 80 pairs by default."""
    return [(caption(o, c, b), {"object": o, "colour": c, "background": b}, s) for (o, c, b) in sorted(HELD_OUT) for s in seeds]


def prompt_following(pipe, evaluator: WorldEvaluator | None = None, seeds=(0, 1), steps: int = STEPS, guidance: float = GUIDANCE) -> dict:
    """Share of images whose evaluator labels match the prompt's object, colour and background."""
    evaluator = evaluator or WorldEvaluator.load()
    pairs = held_out_pairs(seeds)
    images = generate(pipe, [p for p, _, _ in pairs], [s for _, _, s in pairs], steps, guidance)
    predicted = evaluator.predict(images)
    scores = {key: sum(p[key] == want[key] for p, (_, want, _) in zip(predicted, pairs)) / len(pairs)
              for key in ("object", "colour", "background")}
    return {**scores, "pairs": len(pairs)}


def subject_scores(evaluator: WorldEvaluator, references, subject_images, recontext: dict, prior_images, prior_want: dict) -> dict:
    """fidelity: mean embedding cosine of subject images to the instance images; recontext: share of
    `{background: images}` recognized as that background; prior: share of prior images with the wanted
    object and colour."""
    hits = total = 0
    for background, images in recontext.items():
        hits += sum(p["background"] == background for p in evaluator.predict(images))
        total += len(images)
    prior = evaluator.predict(prior_images)
    return {
        "fidelity": fidelity(evaluator, subject_images, references),
        "recontext": hits / max(1, total),
        "prior": sum(p["object"] == prior_want["object"] and p["colour"] == prior_want["colour"] for p in prior) / len(prior),
    }


SUBJECT = "a photo of sks teapot"
GRID_ROWS = (SUBJECT, f"{SUBJECT} on green stripes", f"{SUBJECT} on checks", "a photo of a blue ball")
RECONTEXT = {"stripes": GRID_ROWS[1], "checks": GRID_ROWS[2]}
PRIOR_WANT = {"object": "ball", "colour": "blue"}


SEEDS = 16  # per prompt: 16 images make each share a 6-point step


def sample_set(pipe, seeds: int = SEEDS, steps: int = STEPS) -> dict[str, list]:
    """Every GRID_ROWS prompt at seeds 0..seeds-1 (the same noise before and after training)."""
    prompts = [p for p in GRID_ROWS for _ in range(seeds)]
    images = generate(pipe, prompts, list(range(seeds)) * len(GRID_ROWS), steps)
    return {p: images[i * seeds:(i + 1) * seeds] for i, p in enumerate(GRID_ROWS)}


def quickstart_scores(evaluator: WorldEvaluator, references, images: dict[str, list]) -> dict:
    recontext = {background: images[prompt] for background, prompt in RECONTEXT.items()}
    return subject_scores(evaluator, references, images[SUBJECT], recontext, images[GRID_ROWS[3]], PRIOR_WANT)
