"""`train --select_best METRIC`: every validation's samples are scored (the validation metrics), the
adapter of the best-scoring step is kept in `<output_dir>/best/` with `scores.json` (every validation's
score and which step won); `--early_stop_patience N` ends the run when the score has not improved for
N validations.

The score, from the validation metrics (DreamBooth's models elsewhere, the world's evaluator on the world):
- fidelity: DINO (`dino`), else the world's `world_fidelity`, else CLIP-I;
- prompt: CLIP-T (`clip_t`), else the mean of the world's `world_background` and `world_prior` (those
  the validation prompts ask for: a background, or an object and colour without the subject);
- fidelity_x_prompt: their product (high only when both are).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TrainingError

SELECT_METRICS = ("fidelity", "prompt", "fidelity_x_prompt")
BEST_FOLDER, SCORES_FILE = "best", "scores.json"
FIDELITY = ("dino", "world_fidelity", "clip_i")
PROMPT, WORLD_PROMPT = "clip_t", ("world_background", "world_prior")


def _fidelity(metrics: dict) -> float:
    for name in FIDELITY:
        if name in metrics:
            return metrics[name]
    raise TrainingError(f"--select_best: the validation metrics have no subject fidelity ({', '.join(FIDELITY)}; got "
                        f"{', '.join(metrics) or 'none'}): give a --validation_prompt with the instance prompt's identifier, "
                        "and a --dino_model or the world base.")


def _prompt(metrics: dict) -> float:
    if PROMPT in metrics:
        return metrics[PROMPT]
    world = [metrics[n] for n in WORLD_PROMPT if n in metrics]
    if world:
        return sum(world) / len(world)
    raise TrainingError("--select_best: the validation metrics have no prompt score (clip_t, or on the world a validation "
                        "prompt that names a background, e.g. 'a photo of sks teapot on checks'): give a --clip_model or such a prompt.")


def selection_score(metrics: dict, metric: str) -> float:
    """The `--select_best` score of one validation's metrics (names without the 'validation/' prefix)."""
    metrics = {k.split("/")[-1]: v for k, v in metrics.items()}
    if metric == "fidelity":
        return float(_fidelity(metrics))
    if metric == "prompt":
        return float(_prompt(metrics))
    if metric == "fidelity_x_prompt":
        return float(_fidelity(metrics) * _prompt(metrics))
    raise ValueError(f"select_best {metric!r}: one of {', '.join(SELECT_METRICS)}")


@dataclass
class BestTracker:
    """Every validation's score; which step is best; whether patience has run out."""
    metric: str
    patience: int | None = None
    history: list[dict] = field(default_factory=list)  # [{"step", "score", "metrics"}]

    @property
    def best(self) -> dict | None:
        # the first of equal scores: a later step must beat the best, not tie it
        return max(self.history, key=lambda h: h["score"], default=None) if self.history else None

    def observe(self, step: int, metrics: dict) -> bool:
        """Record a validation; True when it is the new best."""
        score = selection_score(metrics, self.metric)
        before = self.best
        self.history = [h for h in self.history if h["step"] != step]
        self.history.append({"step": step, "score": score, "metrics": {k.split("/")[-1]: v for k, v in metrics.items()}})
        return before is None or score > before["score"]

    def patience_out(self) -> bool:
        """True when the last `patience` validations have not beaten the best before them."""
        if not self.patience or self.best is None:
            return False
        best_at = self.history.index(self.best)
        return len(self.history) - 1 - best_at >= self.patience

    def to_dict(self) -> dict:
        best = self.best
        return {"metric": self.metric, "best_step": best and best["step"], "best_score": best and best["score"],
                "patience": self.patience, "validations": self.history}

    def write(self, folder: Path) -> Path:
        from ..atomic import atomic_write

        path = Path(folder) / SCORES_FILE
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return path

    @classmethod
    def resume(cls, metric: str, patience: int | None, out: Path, up_to_step: int) -> "BestTracker":
        """The tracker of a run resumed at `up_to_step`: the validations best/scores.json holds up to it."""
        tracker = cls(metric, patience)
        path = Path(out) / BEST_FOLDER / SCORES_FILE
        try:
            saved = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            saved = {}
        if saved.get("metric") == metric:
            tracker.history = [h for h in saved.get("validations", []) if h["step"] <= up_to_step]
        return tracker
