"""DreamBooth's metrics on known answers, with tiny random DINO (ViT, DINOv2) and CLIP models built
offline: identical images score 1, the mean is over all pairs and ignores order, CLIP-T is the
hand-computed cosine, different images score below 1; and loading errors are one line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
from PIL import Image

from gralora_diffusion.errors import GraloraConfigError
from gralora_diffusion.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    DreamBoothScorer,
    EmbeddingScorer,
    mean_pairwise_cosine,
    paired_cosine,
    strip_identifier,
)
from gralora_diffusion.tiny_scorers import save_tiny_dino, save_tiny_scorers


def noise_image(seed, size=48):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scorers")
    dino, clip = save_tiny_scorers(folder)
    return {"vit": DinoEmbedder(dino), "dinov2": DinoEmbedder(save_tiny_dino(folder / "dinov2", kind="dinov2")),
            "clip": ClipEmbedder(clip)}


@pytest.fixture(scope="module")
def images():
    return [noise_image(i) for i in range(4)] + [Image.new("RGB", (48, 48), c) for c in ("red", "blue")]


def test_pairwise_mean_on_known_vectors():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert mean_pairwise_cosine(a, b) == pytest.approx((1 + 0 - 1) / 3)
    assert paired_cosine(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([[2.0, 2.0], [1.0, 0.0]])).tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("dino_kind", ["vit", "dinov2"])
def test_identical_images_score_one(models, images, dino_kind):
    scorer = DreamBoothScorer(images[:1], models[dino_kind], models["clip"])
    scores = scorer(images[:1] * 3, ["a teapot"] * 3)  # every pair is (image, itself)
    assert scores["dino"] == pytest.approx(1.0, abs=1e-5)
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dino_kind", ["vit", "dinov2"])
def test_different_images_score_below_one(models, images, dino_kind):
    scores = DreamBoothScorer(images[4:5], models[dino_kind], models["clip"])(images[:4], ["x"] * 4)
    assert scores["dino"] < 0.999 and scores["clip_i"] < 0.999
    assert -1.0 <= scores["dino"] and -1.0 <= scores["clip_i"]


def test_mean_is_over_all_pairs_and_ignores_order(models, images):
    generated, instance = images[:3], images[3:]
    dino = models["vit"]
    scores = DreamBoothScorer(instance, dino, models["clip"], identifier=None)(generated, ["a", "b", "c"])
    by_hand = np.mean([[F.cosine_similarity(dino.embed_images([g]), dino.embed_images([r])).item() for r in instance] for g in generated])
    assert scores["dino"] == pytest.approx(by_hand, abs=1e-5)
    shuffled = DreamBoothScorer(instance[::-1], dino, models["clip"])(generated[::-1], ["c", "b", "a"])
    for name in ("dino", "clip_i", "clip_t"):
        assert shuffled[name] == pytest.approx(scores[name], abs=1e-5)


def test_clip_t_equals_hand_computed_cosine(models, images):
    clip = models["clip"]
    prompts = ["a sks teapot in the snow", "a red sks teapot"]
    scores = DreamBoothScorer(images[:1], None, clip, identifier="sks")(images[:2], prompts)
    assert set(scores) == {"clip_i", "clip_t"}  # no DINO model: no DINO score
    cosines = []
    with torch.no_grad():
        for image, text in zip(images[:2], ["a teapot in the snow", "a red teapot"]):
            pixels = clip.processor(images=[image], return_tensors="pt")["pixel_values"]
            image_embed = clip.model.get_image_features(pixel_values=pixels)
            ids = clip.processor.tokenizer([text], return_tensors="pt")["input_ids"]
            text_embed = clip.model.get_text_features(input_ids=ids)
            pool = [getattr(e, "pooler_output", e) for e in (image_embed, text_embed)]
            cosines.append(F.cosine_similarity(*pool).item())
    assert scores["clip_t"] == pytest.approx(float(np.mean(cosines)), abs=1e-5)


def test_identifier_is_removed_as_a_whole_word_only():
    assert strip_identifier("a sks teapot on the beach", "sks") == "a teapot on the beach"
    assert strip_identifier("asks sks, a teapot", "sks") == "asks , a teapot"
    assert strip_identifier("a sks teapot", None) == "a sks teapot"


def test_embedding_scorer_plugs_in_any_embedding(images):
    def mean_colour(batch):  # a stand-in for the world evaluator's .embed
        return torch.stack([torch.tensor(np.asarray(im, dtype=np.float32).mean((0, 1))) for im in batch])

    scorer = EmbeddingScorer(mean_colour, [images[4]], name="world_fidelity")
    assert scorer([images[4], images[4]], ["x", "y"]) == {"world_fidelity": pytest.approx(1.0)}
    assert scorer([images[5]], ["x"])["world_fidelity"] == pytest.approx(0.0)  # red vs blue: orthogonal


def test_loading_errors_are_one_line(tmp_path, models):
    with pytest.raises(GraloraConfigError, match=r"--dino_model facebook/dino-vits16: not in the local .*hf download facebook/dino-vits16"):
        DinoEmbedder("facebook/dino-vits16")  # conftest sets HF_HUB_OFFLINE=1 and nothing is cached
    with pytest.raises(GraloraConfigError, match="no such folder"):
        ClipEmbedder(str(tmp_path / "missing" / "clip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraloraConfigError, match="cannot load a model from this folder"):
        DinoEmbedder(tmp_path / "empty")
    with pytest.raises(GraloraConfigError, match="not a ViT image model"):
        DinoEmbedder(models["clip"].name)
    with pytest.raises(GraloraConfigError, match="No instance images"):
        DreamBoothScorer([], models["vit"], None)
