"""What `compare --benchmark` hands back: every run (variant, subject, seed, metrics), and per variant
each metric's mean with its 95 % bootstrap interval over subjects x seeds, and the paired difference
against the first variant (the baseline) with its interval (stats.py). Written as results.json and
printed as two tables."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .stats import LEVEL, excludes_zero, interval, paired_difference

RESULTS_NAME = "results.json"


def run_entry(variant, subject: str, rcfg, record: dict, out: Path) -> dict:
    """One run as results.json keeps it."""
    train = record["train"]
    return {"variant": variant.name, "subject": subject, "seed": rcfg.seed, "metrics": record["metrics"],
            "parameters": train["parameters"], "steps": train["steps"], "step_time_s": train["step_time_s"],
            "wall_s": train["wall_s"], "folder": str(Path(rcfg.output_dir).relative_to(out))}


@dataclass
class BenchmarkReport:
    benchmark: str
    base_model: str
    metrics: tuple
    seeds: list[int]
    evaluation: dict  # eval seeds, steps, guidance, resolution
    subjects: list[str]
    variants: list[dict]  # name, spec, parameters, metrics {m: interval}, vs_baseline {m: interval}, step_time_s
    base: dict  # {m: interval over subjects} of the base model alone
    runs: list[dict]
    lower_is_better: tuple = ()
    json_path: Path | None = field(default=None, repr=False)

    @classmethod
    def build(cls, benchmark, base_model, variants, seeds, evaluation: dict, runs, base_runs) -> "BenchmarkReport":
        metrics = benchmark.metrics

        def values(name, metric):
            return {(r["subject"], r["seed"]): r["metrics"].get(metric) for r in runs if r["variant"] == name}

        baseline = variants[0].name
        summary = []
        for v in variants:
            mine = [r for r in runs if r["variant"] == v.name]
            summary.append({
                "name": v.name, "spec": v.spec, "parameters": mine[0]["parameters"] if mine else None, "runs": len(mine),
                "metrics": {m: interval(values(v.name, m).values()) for m in metrics},
                "vs_baseline": {m: paired_difference(values(v.name, m), values(baseline, m)) for m in metrics},
                "step_time_s": interval(r["step_time_s"] for r in mine),
            })
        base = {m: interval(r["metrics"].get(m) for r in base_runs) for m in metrics}
        return cls(benchmark.name, str(base_model), tuple(metrics), list(seeds), evaluation, [t.name for t in benchmark.tasks],
                   summary, base, runs, tuple(benchmark.lower_is_better))

    def to_dict(self) -> dict:
        return {"benchmark": self.benchmark, "base_model": self.base_model, "interval": f"{LEVEL:.0%} percentile bootstrap "
                "over subjects x seeds", "metrics": list(self.metrics), "lower_is_better": list(self.lower_is_better),
                "seeds": self.seeds, "evaluation": self.evaluation, "subjects": self.subjects,
                "baseline": self.variants[0]["name"] if self.variants else None, "base": self.base,
                "variants": self.variants, "runs": self.runs}

    def write(self, out: Path) -> Path:
        from .atomic import atomic_write

        path = Path(out) / RESULTS_NAME
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        self.json_path = path
        return path

    def table(self) -> str:
        """Means [95 % interval] per variant (base first), then each variant minus the baseline, paired
        by subject and seed ('*': the interval excludes 0)."""
        def cell(s, signed=False):
            if not s or s["mean"] is None:
                return "-"
            f = "+.3f" if signed else ".3f"
            star = " *" if signed and excludes_zero(s) else ""
            return f"{s['mean']:{f}} [{s['low']:{f}}, {s['high']:{f}}]{star}"

        names = [f"{m} ↓" if m in self.lower_is_better else m for m in self.metrics]
        rows = [["base", "-", "-", *(cell(self.base[m]) for m in self.metrics)]]
        rows += [[v["name"], f"{v['parameters']:,}" if v["parameters"] else "-", str(v["runs"]),
                  *(cell(v["metrics"][m]) for m in self.metrics)] for v in self.variants]
        lines = _columns(["variant", "params", "runs", *names], rows)
        if len(self.variants) > 1:
            baseline = self.variants[0]["name"]
            diffs = [[v["name"], *(cell(v["vs_baseline"][m], signed=True) for m in self.metrics)] for v in self.variants[1:]]
            lines += ["", f"paired difference against {baseline} (same subject, same seed):"]
            lines += _columns([f"variant - {baseline}", *names], diffs)
        lines.append(f"({self.benchmark}: {len(self.subjects)} subjects x {len(self.seeds)} seed{'s' * (len(self.seeds) != 1)}; "
                     f"{LEVEL:.0%} bootstrap intervals over subjects x seeds; * = interval excludes 0)")
        return "\n".join(lines)


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
