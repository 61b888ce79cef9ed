"""`world-bench`: the tiny world's benchmark. Its subjects (world/subjects.py) are drawn by code into
`<output_dir>/subjects/<name>/` (the training input; rewritten only when a drawing changed), and each
run is scored with the world's evaluator:

- fidelity: mean cosine of the evaluator's embedding, the subject's images (alone and on every
  background) against its instance images (DreamBooth's DINO score, the world's embedding);
- recontext: share of `sks <class> on <background>` images recognized as that background;
- prior: share of `a <colour> <class>` images (colours the subject does not have) that are that;
- drift: PEFT's (1 - cos)/2 between the base model's and the adapted model's images of unrelated
  world scenes, same seeds (metrics.drift), in the evaluator's embedding. Lower is better.
"""

from __future__ import annotations

import io
from pathlib import Path

from .benchmark import Benchmark, Task, unrelated_pairs

NAME = "world-bench"
METRICS = ("fidelity", "recontext", "prior", "drift")
# Training and evaluation settings of the benchmark; flags and --config override them.
DEFAULTS = {"pretrained_model_name_or_path": "world", "resolution": 64, "train_batch_size": 2, "max_train_steps": 150,
            "learning_rate": 1e-3, "checkpointing_steps": 50, "num_inference_steps": 20, "dino_model": "none",
            "clip_model": "none", "report_to": "none"}


class WorldBenchScorer:
    """(images, prompts) -> fidelity, recontext, prior and, given the base model's images, drift."""

    def __init__(self, subject, evaluator, base_images: dict | None = None):
        from .world.scorers import WorldScorer
        from .world.subjects import IDENTIFIER

        self.roles = {p: role for role, ps in subject.prompts().items() for p in ps}
        self.world = WorldScorer(subject.instance_images(), IDENTIFIER, evaluator)
        self.evaluator, self.base_images = evaluator, base_images

    def __call__(self, images, prompts) -> dict:
        from .metrics import drift

        def pick(*roles):
            chosen = [(im, p) for im, p in zip(images, prompts) if self.roles.get(p) in roles]
            return [im for im, _ in chosen], [p for _, p in chosen]

        scores = self.world(*pick("subject", "recontext"))
        out = {"fidelity": scores["world_fidelity"], "recontext": scores["world_background"],
               "prior": self.world(*pick("prior"))["world_prior"]}
        if self.base_images is not None:
            base, adapted = unrelated_pairs(self.base_images, images, prompts)
            out["drift"] = drift(self.evaluator.embed(base), self.evaluator.embed(adapted))
        return out


def write_subject_images(subject, folder: Path) -> Path:
    """The subject's instance images as PNGs in `folder`; a file is rewritten only when its bytes differ."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(subject.instance_images()):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path = folder / f"{i}.png"
        if not path.is_file() or path.read_bytes() != buffer.getvalue():
            path.write_bytes(buffer.getvalue())
    return folder


def world_benchmark(output_dir, count: int | None = None) -> Benchmark:
    """The first `count` subjects (all when None) as tasks, their images written under output_dir/subjects."""
    from .errors import GraloraConfigError
    from .world.evaluator import WorldEvaluator
    from .world.subjects import SUBJECTS, subjects

    if count is not None and not 1 <= count <= len(SUBJECTS):
        raise GraloraConfigError(f"--subjects {count}: world-bench has {len(SUBJECTS)} subjects; give 1 to {len(SUBJECTS)}.")
    evaluator = WorldEvaluator.load()
    tasks = []
    for subject in subjects(count):
        folder = write_subject_images(subject, Path(output_dir) / "subjects" / subject.name)
        tasks.append(Task(subject.name, folder, subject.instance_prompt, subject.prompts(),
                          lambda base, s=subject: WorldBenchScorer(s, evaluator, base)))
    # One evaluation seed: the spread that matters is over subjects and training seeds; 11 images a run
    # keep the default benchmark (2 variants x 10 subjects) near 20 minutes on 2 CPU cores.
    return Benchmark(NAME, tasks, METRICS, eval_seeds=(0,))
