"""What `compare` hands back: one entry per variant (settings, parameter count, metrics mean ± std over
seeds, step time, peak memory), written as results.json, a terminal table, and grid.png (rows: prompts,
columns: the base model, then each variant's first seed; the evaluation seeds side by side per cell)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_NAME, GRID_NAME = "results.json", "grid.png"
BASE_FOLDER, EVAL_FOLDER = "base", "eval"  # the base model's evaluation, and each run's images


def spread(values) -> dict:
    """{"mean", "std" (sample std over seeds; None with one), "values"}; None values left out."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "values": []}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def summarize(variant, cfg, seeds: list[int], records: list[dict]) -> dict:
    """One results.json entry from the variant's runs (`cfg`: its first run's config)."""
    from .train.checkpoint import shaping_settings

    names = list(records[0]["metrics"])
    trained = [r["train"] for r in records]
    return {
        "name": variant.name, "spec": variant.spec, "kind": records[0].get("kind"),
        "settings": {**shaping_settings(cfg), "learning_rate": cfg.learning_rate, "steps": trained[0]["steps"]},
        "parameters": trained[0]["parameters"], "seeds": seeds,
        "metrics": {name: spread(r["metrics"].get(name) for r in records) for name in names},
        "step_time_s": spread(t["step_time_s"] for t in trained),
        "peak_memory_mb": spread(t["peak_memory_mb"] for t in trained), "memory": trained[0]["memory"],
        "runs": [f"{variant.name}/seed{s}" for s in seeds],
    }


@dataclass
class Comparison:
    entries: list[dict]  # results.json
    base_metrics: dict = field(default_factory=dict)
    json_path: Path | None = None
    grid_path: Path | None = None

    def table(self) -> str:
        """Rows: base, then the variants; metrics as mean ± std (± left out with one seed)."""
        names = [m for m in ("dino", "clip_i", "clip_t") if m in self.base_metrics or any(m in e["metrics"] for e in self.entries)]
        names += sorted({m for e in self.entries for m in e["metrics"]} - set(names))

        def cell(s: dict | None, digits: int = 3) -> str:
            if not s or s["mean"] is None:
                return "-"
            return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")

        header = ["variant", "params", *names, "step s", "peak MB"]
        rows = [["base", "-", *(cell(spread([self.base_metrics[n]]) if n in self.base_metrics else None) for n in names), "-", "-"]]
        for e in self.entries:
            rows.append([e["name"], f"{e['parameters']:,}", *(cell(e["metrics"].get(n)) for n in names),
                         cell(e["step_time_s"]), cell(e["peak_memory_mb"], 0)])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
        seeds = self.entries[0]["seeds"] if self.entries else []
        return "\n".join(lines + [f"({len(seeds)} seed{'s' * (len(seeds) != 1)} per variant; memory: "
                                  f"{self.entries[0]['memory'] if self.entries else '-'})"])


def load_images(folder: Path, prompts: int, seeds: int) -> list[list]:
    from .images import read_image

    return [[read_image(folder / f"p{p}-s{s}.png") for s in range(seeds)] for p in range(prompts)]


def write_report(out: Path, entries: list[dict], base_record: dict, ev) -> Comparison:
    """results.json and grid.png in `out`."""
    from .evaluate import BASE_LABEL, VariantResult
    from .grids import labelled_variant_grid

    columns = [VariantResult(BASE_LABEL, None, None, images=load_images(out / BASE_FOLDER / EVAL_FOLDER, len(ev.prompts), len(ev.seeds)))]
    for e in entries:
        images = load_images(out / e["runs"][0] / EVAL_FOLDER, len(ev.prompts), len(ev.seeds))
        columns.append(VariantResult(e["name"], e["runs"][0], e["kind"], images=images))
    from .atomic import atomic_write
    from .generate import save_image

    grid = out / GRID_NAME
    save_image(labelled_variant_grid(columns, ev.prompts), grid)
    path = out / RESULTS_NAME
    text = json.dumps(entries, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return Comparison(entries, base_record["metrics"], path, grid)
