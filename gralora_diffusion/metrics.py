"""DreamBooth's subject-fidelity metrics (Ruiz et al. 2023, section 4.1): the embedding models and the
similarities.

- DINO: mean cosine similarity of ViT [CLS] features (a self-supervised DINO / DINOv2 model) over
  every (generated, instance) pair;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine similarity of each generated image's CLIP embedding with its prompt's.

Models load through transformers (`AutoModel`, `AutoImageProcessor`, `AutoProcessor`) by Hub id or
from a `save_pretrained` folder; with no torchvision installed transformers picks its PIL image
processors. A scorer is any callable `(images, prompts) -> {metric: value}`, bound to the instance
images when it is built, so the tiny world's evaluator plugs in the same way (`EmbeddingScorer`).
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .constants import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL  # noqa: F401  (re-exported: this module's public names)
from .errors import GraloraConfigError
from .quiet import load_pretrained, quiet_libraries  # noqa: F401  (quiet_libraries: re-exported, older imports)

BATCH_SIZE = 16

Scorer = Callable[[Sequence[Image.Image], Sequence[str]], dict]


def _pooled(output) -> torch.Tensor:
    """`get_image_features`/`get_text_features` return a tensor in transformers 4 and an output whose
    `pooler_output` is the projected embedding in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _rgb(images) -> list[Image.Image]:
    return [image.convert("RGB") for image in images]


class ImageEmbedder:
    """Unit-norm image embeddings in batches through the model's processor; subclasses say which features."""

    processor = model = None

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), BATCH_SIZE):
            pixels = self.processor(images=_rgb(images[i:i + BATCH_SIZE]), return_tensors="pt")["pixel_values"]
            feats.append(self.features(pixels.to(self.model.device, self.model.dtype)).float())
        return F.normalize(torch.cat(feats), dim=-1)


class DinoEmbedder(ImageEmbedder):
    """[CLS] token of the last layer (after the final LayerNorm), as DreamBooth uses DINO ViT-S/16."""

    def __init__(self, name: str = DEFAULT_DINO_MODEL, device=None, flag: str = "--dino_model"):
        from transformers import AutoImageProcessor, AutoModel

        self.name = str(name)
        hint = f"a transformers save_pretrained folder, or `{flag} none` to skip DINO"
        self.processor = load_pretrained(AutoImageProcessor, name, flag, folder_hint=hint)
        self.model = load_pretrained(AutoModel, name, flag, folder_hint=hint).to(device or "cpu").eval()
        inputs = inspect.signature(self.model.forward).parameters
        if "pixel_values" not in inputs or "input_ids" in inputs:
            raise GraloraConfigError(f"{flag} {name}: {type(self.model).__name__} is not a ViT image model; "
                                     "give a DINO / DINOv2 model such as facebook/dino-vits16.")

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class ClipEmbedder(ImageEmbedder):
    """CLIP's projected image and text embeddings (`get_image_features`, `get_text_features`)."""

    def __init__(self, name: str = DEFAULT_CLIP_MODEL, device=None, flag: str = "--clip_model"):
        from transformers import AutoModel, AutoProcessor

        self.name = str(name)
        hint = f"a transformers save_pretrained folder, or `{flag} none` to skip CLIP-I and CLIP-T"
        self.processor = load_pretrained(AutoProcessor, name, flag, folder_hint=hint)
        self.model = load_pretrained(AutoModel, name, flag, folder_hint=hint).to(device or "cpu").eval()
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise GraloraConfigError(f"{flag} {name}: {type(self.model).__name__} is not a CLIP model (no image and "
                                     "text embeddings); give one such as openai/clip-vit-base-patch32.")

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(self.model.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(_pooled(self.model.get_text_features(**tokens)).float(), dim=-1)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every (row of a, row of b) pair: DreamBooth's DINO and CLIP-I."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean().item()


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of a with row i of b: CLIP-T per image."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def drift(base: torch.Tensor, adapted: torch.Tensor) -> float:
    """PEFT's drift (method_comparison/image-gen/run.py, `measure_drift`): (1 - mean cosine)/2 between
    the embeddings of the base model's and the adapted model's images of the same prompts and seeds,
    row i with row i; 0 when nothing changed, 1 at the opposite (clamped there: float rounding can put a
    cosine a hair above 1)."""
    return min(1.0, max(0.0, (1 - paired_cosine(base, adapted).mean().item()) / 2))


def strip_identifier(prompt: str, identifier: str | None) -> str:
    """'a sks teapot in the snow' -> 'a teapot in the snow': CLIP has never seen the rare token, so
    CLIP-T measures the prompt's meaning without it (as Custom Diffusion's evaluation does)."""
    if not identifier:
        return prompt
    return " ".join(re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", " ", prompt).split())


class DreamBoothScorer:
    """DINO, CLIP-I and CLIP-T of generated images against the instance images (embedded once)."""

    def __init__(self, instance_images: Sequence[Image.Image], dino: DinoEmbedder | None, clip: ClipEmbedder | None,
                 identifier: str | None = None):
        if not instance_images:
            raise GraloraConfigError("No instance images to compare the generated images with.")
        self.dino, self.clip, self.identifier = dino, clip, identifier
        self.ref_dino = dino.embed_images(instance_images) if dino else None
        self.ref_clip = clip.embed_images(instance_images) if clip else None

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
        scores = {}
        if self.dino is not None:
            scores["dino"] = mean_pairwise_cosine(self.dino.embed_images(images), self.ref_dino)
        if self.clip is not None:
            image_embeds = self.clip.embed_images(images)
            scores["clip_i"] = mean_pairwise_cosine(image_embeds, self.ref_clip)
            texts = [strip_identifier(p, self.identifier) for p in prompts]
            scores["clip_t"] = paired_cosine(image_embeds, self.clip.embed_texts(texts)).mean().item()
        return scores


class EmbeddingScorer:
    """Subject fidelity from any image embedding `embed(images) -> [n, d]` (e.g. the tiny world's
    `WorldEvaluator.embed`): mean pairwise cosine of generated vs instance embeddings, as DINO."""

    def __init__(self, embed: Callable, instance_images: Sequence[Image.Image], name: str = "fidelity"):
        self.embed, self.name = embed, name
        self.reference = torch.as_tensor(embed(list(instance_images)))

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
        return {self.name: mean_pairwise_cosine(torch.as_tensor(self.embed(list(images))), self.reference)}
