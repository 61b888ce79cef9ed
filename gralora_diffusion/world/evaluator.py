"""The world's evaluator: a small CNN with object, colour and background heads, trained on renders.

Its penultimate features are the world's stand-in for DINO: `embed` gives them, and the mean
cosine similarity of generated images to instance images is DreamBooth's subject-fidelity metric.

    ev = WorldEvaluator.load()
    ev.predict(images)   # -> [{"object": "ball", "colour": "red", "background": "sky"}, ...]
    ev.embed(images)     # -> N x 128 tensor
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .draw import BACKGROUNDS, COLOURS, OBJECTS, SIZE, render_batch
from .pretrain import to_unit

EVAL_SEED, TEST_SEED = 3, 5
EMBED_DIM = 128
HEADS = {"object": OBJECTS, "colour": tuple(COLOURS), "background": BACKGROUNDS}
WEIGHTS = Path(__file__).resolve().parent / "weights" / "evaluator.safetensors"


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class WorldEvaluator(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, 32, 2), _block(32, 64, 1), _block(64, 64, 2),
            _block(64, 128, 1), _block(128, 128, 2), _block(128, 128, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, EMBED_DIM), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(EMBED_DIM, len(classes)) for name, classes in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    @classmethod
    def load(cls, path: str | Path = WEIGHTS) -> "WorldEvaluator":
        from safetensors.torch import load_file

        model = cls()
        model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def predict(self, images) -> list[dict]:
        logits = self(to_batch(images))
        names = {name: logits[name].argmax(-1).tolist() for name in HEADS}
        return [{name: HEADS[name][names[name][i]] for name in HEADS} for i in range(len(names["object"]))]

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        return self.features(to_batch(images))


def to_batch(images) -> torch.Tensor:
    """PIL images (any size; resized to the world's) or a float tensor in [-1, 1] -> N x 3 x SIZE x SIZE in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def fidelity(evaluator: WorldEvaluator, images, references) -> float:
    """Mean cosine similarity of every image's embedding to every reference's (DreamBooth's DINO score)."""
    from ..metrics import mean_pairwise_cosine

    return mean_pairwise_cosine(evaluator.embed(images), evaluator.embed(references))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Generated images are softer and noisier than renders: blur a third, add noise to half.
    kernel = torch.tensor([0.25, 0.5, 0.25])
    k2 = (kernel[:, None] * kernel[None]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    pick = torch.rand(x.shape[0], 1, 1, 1, generator=gen)
    x = torch.where(pick < 0.33, blurred, x)
    noise = torch.randn(x.shape, generator=gen) * 0.06 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5)
    return (x + noise).clamp(-1, 1)


def train_evaluator(run_dir: Path, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0, stop_at: int | None = None) -> dict:
    """Train on fresh renders each step; report and return held-out accuracy (all three heads)."""
    from .pretrain import run_stage

    torch.manual_seed(seed)
    model = WorldEvaluator()

    def step_fn(step, extra):
        images, labels, _ = render_batch(EVAL_SEED, step * batch, batch)
        x = _augment(to_unit(images), torch.Generator().manual_seed(seed * 100_003 + step))
        logits = model(x)
        y = torch.from_numpy(labels)
        loss = sum(F.cross_entropy(logits[name], y[:, i]) for i, name in enumerate(HEADS))
        return loss, {}

    run_stage(run_dir, "evaluator", {"model": model}, list(model.parameters()), steps, step_fn, lr, warmup=50, stop_at=stop_at)
    accuracy = held_out_accuracy(model.eval())
    print("evaluator held-out accuracy:", {k: round(v, 4) for k, v in accuracy.items()})
    return accuracy


@torch.no_grad()
def held_out_accuracy(model: WorldEvaluator, count: int = 2000) -> dict[str, float]:
    images, labels, _ = render_batch(TEST_SEED, 0, count)
    x, y = to_unit(images), torch.from_numpy(labels)
    hits = {name: 0 for name in HEADS}
    for i in range(0, count, 250):
        logits = model(x[i:i + 250])
        for j, name in enumerate(HEADS):
            hits[name] += int((logits[name].argmax(-1) == y[i:i + 250, j]).sum())
    return {name: hits[name] / count for name in HEADS}
