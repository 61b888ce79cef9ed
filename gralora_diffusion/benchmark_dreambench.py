"""`dreambench`: DreamBooth's own benchmark (Ruiz et al. 2023; github.com/google/dreambooth, `dataset/`):
a folder per subject (`backpack/`, `dog2/`, ... with its photos) and `prompts_and_classes.txt`, whose
`subject_name,class` lines give each subject's class word. Each subject is trained as `a photo of sks
<class>` and scored on the paper's 25 prompts (object or live-subject list) with the paper's metrics:
DINO (ViT-S/16 by default), CLIP-I and CLIP-T (`--dino_model`, `--clip_model`: Hub ids or folders),
plus drift: PEFT's (1 - cos)/2 between the base model's and the adapted model's DINO embeddings of
unrelated prompts (PEFT's own drift prompts that name no DreamBooth class), same seeds.
"""

from __future__ import annotations

import re
from pathlib import Path

from .benchmark import UNRELATED, Benchmark, Task, unrelated_pairs
from .constants import IMAGE_SUFFIXES
from .errors import GraloraConfigError

NAME = "dreambench"
CLASSES_FILE = "prompts_and_classes.txt"
IDENTIFIER = "sks"
METRICS = ("dino", "clip_i", "clip_t", "drift")
LIVE_CLASSES = ("cat", "dog")  # the paper's live subjects get the live-subject prompts
# The paper's 25 prompts ({0}: identifier, {1}: class), as in the dataset's prompts_and_classes.txt.
SCENES = ("a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach", "a {0} {1} on a cobblestone street",
          "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
          "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
          "a {0} {1} on top of a purple rug in a forest")
PROPERTIES = ("a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}")
OBJECT_PROMPTS = SCENES + (
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug") + PROPERTIES
LIVE_PROMPTS = SCENES + (
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit", "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses", "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit") + PROPERTIES
# PEFT's drift prompts (method_comparison/image-gen) that name no DreamBooth class
UNRELATED_PROMPTS = ("the Mona Lisa but she looks angry", "a photo of the Eiffel tower at night")


def read_classes(folder: Path) -> dict[str, str]:
    """{subject folder: class word} from `prompts_and_classes.txt` (its `subject_name,class` lines)."""
    path = folder / CLASSES_FILE
    if not path.is_file():
        raise GraloraConfigError(f"--benchmark_dir {folder}: no {CLASSES_FILE}; give DreamBooth's dataset folder "
                                 "(git clone https://github.com/google/dreambooth; it is dreambooth/dataset).")
    classes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\s*([\w.-]+)\s*,\s*([^,'\"{}()]+?)\s*", line)
        if match and match.group(1) != "subject_name":
            classes[match.group(1)] = match.group(2)
    if not classes:
        raise GraloraConfigError(f"{path}: no 'subject_name,class' lines (e.g. 'backpack,backpack').")
    return classes


def subject_prompts(cls: str) -> dict[str, list[str]]:
    templates = LIVE_PROMPTS if cls in LIVE_CLASSES else OBJECT_PROMPTS
    return {"subject": [t.format(IDENTIFIER, cls) for t in templates], UNRELATED: list(UNRELATED_PROMPTS)}


class DreamBenchScorer:
    """(images, prompts) -> DINO, CLIP-I, CLIP-T on the subject's prompts and, given the base model's
    images, drift in DINO's embedding on the unrelated ones."""

    def __init__(self, instance_images, dino, clip, roles: dict[str, str], base_images: dict | None = None):
        from .metrics import DreamBoothScorer

        self.scorer = DreamBoothScorer(instance_images, dino, clip, IDENTIFIER)
        self.dino, self.roles, self.base_images = dino, roles, base_images

    def __call__(self, images, prompts) -> dict:
        from .metrics import drift

        subject = [(im, p) for im, p in zip(images, prompts) if self.roles.get(p) == "subject"]
        out = self.scorer([im for im, _ in subject], [p for _, p in subject])
        if self.base_images is not None and self.dino is not None:
            base, adapted = unrelated_pairs(self.base_images, images, prompts)
            out["drift"] = drift(self.dino.embed_images(base), self.dino.embed_images(adapted))
        return out


def dreambench(folder, cfg, count: int | None = None) -> Benchmark:
    """The dataset's subjects (sorted; the first `count` when given) as tasks, scored with cfg's DINO and CLIP."""
    from .evaluate import read_instance_images
    from .bases import default_device_dtype
    from .metrics import ClipEmbedder, DinoEmbedder

    folder = Path(folder)
    if not folder.is_dir():
        raise GraloraConfigError(f"--benchmark_dir {folder}: no such folder (DreamBooth's dataset folder).")
    classes = read_classes(folder)
    names = sorted(n for n in classes if (folder / n).is_dir())
    missing = sorted(set(classes) - set(names))
    if missing:
        raise GraloraConfigError(f"--benchmark_dir {folder}: {CLASSES_FILE} names {', '.join(missing)} but there is no such "
                                 "subject folder; give the complete dataset.")
    empty = [n for n in names if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in (folder / n).iterdir())]
    if empty:
        raise GraloraConfigError(f"--benchmark_dir {folder}: no images in {', '.join(empty)} ({', '.join(IMAGE_SUFFIXES)}).")
    if count is not None and count > len(names):
        raise GraloraConfigError(f"--subjects {count}: {folder} has {len(names)} subjects.")
    dino_name, clip_name = cfg.metric_models
    if not (dino_name or clip_name):
        raise GraloraConfigError("--benchmark dreambench scores with DINO and CLIP: give --dino_model and --clip_model (not none).")
    device = default_device_dtype(None)[0]
    dino = DinoEmbedder(dino_name, device) if dino_name else None
    clip = ClipEmbedder(clip_name, device) if clip_name else None
    tasks = []
    for name in names[:count]:
        prompts = subject_prompts(classes[name])
        roles = {p: role for role, ps in prompts.items() for p in ps}
        images = read_instance_images(folder / name)
        tasks.append(Task(name, folder / name, f"a photo of {IDENTIFIER} {classes[name]}", prompts,
                          lambda base, i=images, r=roles: DreamBenchScorer(i, dino, clip, r, base)))
    return Benchmark(NAME, tasks, METRICS if dino else METRICS[:-1])
