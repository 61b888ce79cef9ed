"""Our GraLoRA Linear layer: PEFT's layer plus the scale control diffusers calls, and a faster forward.

PEFT's `GraloraLayer` has no `set_scale` / `scale_layer` / `unscale_layer`, so diffusers'
per-call scale (`cross_attention_kwargs={"scale": s}`), `set_adapters` and
`fuse_lora(lora_scale=s)` raise AttributeError on it. This subclass adds them with the same
semantics as PEFT's LoRA layer. It adds no state of its own, so parameters, state-dict keys and
`merge`/`unmerge` are exactly PEFT's.

The forward computes PEFT's update without its two full-output temporaries (the copy that ends
its second einsum and the `scaling * output` tensor): the k up-projections accumulate straight
into a block view of the base layer's output, `scaling` being the matmul's alpha. `_BlockUpdate`
holds that step and its hand-written backward, so autograd keeps no full-size buffer either.
"""

from __future__ import annotations

import torch
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear


class _BlockUpdate(torch.autograd.Function):
    """result[M, out] += s · GraLoRA(x[M, in]; A[k, in/k, r], B[k, r, out/k]), in place.

    Block n of x is projected by A[n] to r dims, h[n] = x_n A[n]. Output block j reads the
    j-th rank-t slice of every h[n] (t = r/k): g[j] = [h[0][:, jt:(j+1)t], …, h[k-1][:, jt:(j+1)t]],
    the small permutation of PEFT's layer, and gets s · g[j] B[j]. With k = 1 it is a plain LoRA
    update, which is how the hybrid branch uses it.
    """

    @staticmethod
    def forward(ctx, result, x, A, B, scaling):
        k, i, r = A.shape
        o, M, t = B.shape[2], x.shape[0], r // k
        h = torch.bmm(x.view(M, k, i).transpose(0, 1), A)  # [k (n), M, r]
        g = h.view(k, M, k, t).transpose(0, 2).contiguous().view(k, M, r)  # [k (j), M, n·t]
        blocks = result.view(M, k, o).transpose(0, 1)  # [k (j), M, out/k], a view of result
        if result.dtype == g.dtype:
            blocks.baddbmm_(g, B, alpha=scaling)
        else:  # adapter and base in different dtypes: PEFT casts the update to the result's dtype
            blocks.add_(torch.bmm(g, B).to(result.dtype), alpha=scaling)
        ctx.save_for_backward(x, A, B, g)
        ctx.scaling = scaling
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        x, A, B, g = ctx.saved_tensors
        k, i, r = A.shape
        o, M, t, s = B.shape[2], x.shape[0], r // k, ctx.scaling
        grad_blocks = grad.contiguous().view(M, k, o).transpose(0, 1).to(g.dtype)  # [k, M, out/k]
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[3]:
            grad_B = torch.bmm(g.transpose(1, 2), grad_blocks).mul_(s)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_g = torch.bmm(grad_blocks, B.transpose(1, 2)).mul_(s)  # [k (j), M, n·t]
            grad_h = grad_g.view(k, M, k, t).transpose(0, 2).contiguous().view(k, M, r)  # [k (n), M, r]
            if ctx.needs_input_grad[2]:
                grad_A = torch.bmm(x.view(M, k, i).permute(1, 2, 0), grad_h)
            if ctx.needs_input_grad[1]:
                grad_x = x.new_empty(M, k * i)
                # beta=0: the uninitialised buffer is ignored; written in place, no transpose copy
                grad_x.view(M, k, i).transpose(0, 1).baddbmm_(grad_h, A.transpose(1, 2), beta=0)
        return grad, grad_x, grad_A, grad_B, None


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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PEFT's forward (disable/merged handling, active adapters, dtype casts, one dropout
        call per branch in PEFT's order), with the update accumulated in place into the result."""
        if torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmuls pick their own dtype, which the in-place accumulation
            # cannot follow (bf16 products into an fp32 result); PEFT's out-of-place path can.
            return super().forward(x, *args, **kwargs)
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result.to(previous_dtype)
        result = result.contiguous()
        rows = result.numel() // self.out_features
        for adapter in self.active_adapters:
            if adapter not in self.gralora_A:
                continue
            A, B = self.gralora_A[adapter], self.gralora_B[adapter]
            dropout, scaling = self.gralora_dropout[adapter], self.scaling[adapter]
            x_adapter = x.to(A.dtype)
            xd = dropout(x_adapter).reshape(rows, self.in_features)
            result = _BlockUpdate.apply(result, xd, A, B, scaling)
            if self.hybrid_r[adapter] > 0:
                # Plain LoRA of rank hybrid_r: the k = 1 case, on the weights of PEFT's two Linears.
                A_general = self.gralora_A_general[adapter].weight.t().unsqueeze(0)  # [1, in, hybrid_r]
                B_general = self.gralora_B_general[adapter].weight.t().unsqueeze(0)  # [1, hybrid_r, out]
                xd = dropout(x_adapter).reshape(rows, self.in_features)
                result = _BlockUpdate.apply(result, xd, A_general, B_general, scaling)
        return result.to(previous_dtype)
