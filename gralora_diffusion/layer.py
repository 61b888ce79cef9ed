"""Our GraLoRA Linear layer: PEFT's layer plus the scale control diffusers calls.

PEFT's `GraloraLayer` has no `set_scale` / `scale_layer` / `unscale_layer`, so diffusers'
per-call scale (`cross_attention_kwargs={"scale": s}`), `set_adapters` and
`fuse_lora(lora_scale=s)` raise AttributeError on it. This subclass adds them with the same
semantics as PEFT's LoRA layer. It adds no state of its own, so parameters, state-dict keys and
`merge`/`unmerge` are exactly PEFT's.
"""

from __future__ import annotations

from peft.tuners.gralora.layer import Linear as PeftGraloraLinear


class GraloraLinear(PeftGraloraLinear):
    def base_scaling(self, adapter: str) -> float:
        """alpha / (r + hybrid_r): the scaling at strength 1."""
        return self.alpha[adapter] / (self.r[adapter] + self.hybrid_r[adapter])

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the adapter's strength: scaling = scale * alpha / (r + hybrid_r)."""
        if adapter not in self.scaling:
            return
        self.scaling[adapter] = scale * self.base_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the current scaling of every active adapter by `scale`."""
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self.gralora_A:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo `scale_layer(scale)`; with `scale=None` reset to the strength-1 scaling."""
        for adapter in self.active_adapters:
            if adapter not in self.gralora_A:
                continue
            if scale is None:
                self.scaling[adapter] = self.base_scaling(adapter)
            else:
                self.scaling[adapter] /= scale
