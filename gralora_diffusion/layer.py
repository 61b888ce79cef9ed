"""Our GraLoRA Linear layer: PEFT's layer plus the scale control diffusers calls, a faster forward,
and one adapter per sample (`adapter_names=`, PEFT's mixed batches for LoRA).

PEFT's `GraloraLayer` has no `set_scale` / `scale_layer` / `unscale_layer`, so diffusers'
per-call scale (`cross_attention_kwargs={"scale": s}`), `set_adapters` and
`fuse_lora(lora_scale=s)` raise AttributeError on it. This subclass adds them with the same
semantics as PEFT's LoRA layer. It adds no parameters or buffers of its own (only a transient
cache of a mixed batch's gathered factors), so parameters, state-dict keys and `merge`/`unmerge` are
exactly PEFT's. A scaling may be a 0-d tensor (hot-swap), filled in place by every scale change.

The forward computes PEFT's update without its two full-output temporaries (the copy that ends
its second einsum and the `scaling * output` tensor): the k up-projections accumulate straight
into a block view of the base layer's output, `scaling` being the matmul's alpha. The hybrid
LoRA branch rides in the same two batched matmuls as k extra rank columns. Under `torch.autocast`
the update is computed in autocast's dtype, as PEFT's matmuls would be, and the output keeps the
base layer's dtype, as `nn.Linear` and PEFT's LoRA layer do (PEFT's GraLoRA layer casts it back
to the input's dtype, a full-size copy). `_BlockUpdate` holds that step and its hand-written
backward, so autograd keeps no full-size buffer either.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear


class _BlockUpdate(torch.autograd.Function):
    """result[M, out] += s · GraLoRA(x[M, in]; A[k, in/k, r], B[k, r, out/k]) (+ hybrid), in place.

    Block n of x is projected by A[n] to r dims, h[n] = x_n A[n]. Output block j reads the
    j-th rank-t slice of every h[n] (t = r/k): g[j] = [h[0][:, jt:(j+1)t], …, h[k-1][:, jt:(j+1)t]],
    the small permutation of PEFT's layer, and gets s · g[j] B[j]. The hybrid LoRA (A_g [hr, in],
    B_g [out, hr]) is split the same way: block n of x gets A_g's n-th column block as hr extra
    columns of A[n], their sum over n is x A_gᵀ, which every output block j reads as hr extra
    rows of B[j] (B_g's j-th row block). The matmuls run in `dtype`; gradients return in it and
    autograd casts them to each parameter's own dtype (fp32 master weights under autocast).
    """

    @staticmethod
    def forward(ctx, result, x, A, B, A_g, B_g, scaling, dtype):
        k, i, r = A.shape
        o, M, t = B.shape[2], x.shape[0], r // k
        x = x.to(dtype)
        if A_g is None:
            A, B, hr = A.to(dtype), B.to(dtype), 0
        else:
            hr = A_g.shape[0]
            A = torch.cat((A.to(dtype), A_g.to(dtype).view(hr, k, i).permute(1, 2, 0)), dim=2)  # [k, in/k, r+hr]
            B = torch.cat((B.to(dtype), B_g.to(dtype).view(k, o, hr).transpose(1, 2)), dim=1)  # [k, r+hr, out/k]
        h = torch.bmm(x.view(M, k, i).transpose(0, 1), A)  # [k (n), M, r+hr]
        if hr:
            g = h.new_empty(k, M, r + hr)
            g[..., :r].unflatten(2, (k, t)).copy_(h[..., :r].unflatten(2, (k, t)).transpose(0, 2))
            g[..., r:].copy_(h[..., r:].sum(0).expand(k, M, hr))
        else:
            g = h.view(k, M, k, t).transpose(0, 2).contiguous().view(k, M, r)  # [k (j), M, n·t]
        blocks = result.view(M, k, o).transpose(0, 1)  # [k (j), M, out/k], a view of result
        if isinstance(scaling, torch.Tensor):  # a 0-d tensor (hot-swap): no alpha=, B scaled instead (rank-sized)
            if result.dtype == dtype:
                blocks.baddbmm_(g, B * scaling)
            else:
                blocks.add_(torch.bmm(g, B * scaling).to(result.dtype))
        elif result.dtype == dtype:
            blocks.baddbmm_(g, B, alpha=scaling)
        else:  # base output in another dtype: PEFT casts the update to the result's dtype
            blocks.add_(torch.bmm(g, B).to(result.dtype), alpha=scaling)
        ctx.save_for_backward(x, A, B, g)
        ctx.scaling, ctx.hr = scaling, hr
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        x, A, B, g = ctx.saved_tensors
        k, i, rh = A.shape
        hr, s = ctx.hr, ctx.scaling
        o, M, r = B.shape[2], x.shape[0], rh - hr
        t = r // k
        grad_blocks = grad.view(M, k, o).transpose(0, 1).to(g.dtype)  # [k, M, out/k]
        grad_x = grad_A = grad_B = grad_A_g = grad_B_g = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[5]:
            grad_Bc = torch.bmm(g.transpose(1, 2), grad_blocks).mul_(s)  # [k, r+hr, out/k]
            grad_B = grad_Bc[:, :r]
            if hr:
                grad_B_g = grad_Bc[:, r:].transpose(1, 2).reshape(k * o, hr)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            grad_g = torch.bmm(grad_blocks, B.transpose(1, 2)).mul_(s)  # [k (j), M, n·t (+hr)]
            if hr:
                grad_h = grad_g.new_empty(k, M, rh)
                grad_h[..., :r].unflatten(2, (k, t)).copy_(grad_g[..., :r].unflatten(2, (k, t)).transpose(0, 2))
                grad_h[..., r:].copy_(grad_g[..., r:].sum(0).expand(k, M, hr))
            else:
                grad_h = grad_g.view(k, M, k, t).transpose(0, 2).contiguous().view(k, M, r)  # [k (n), M, r]
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
                x_blocks = x.view(M, k, i).transpose(0, 1)  # [k, M, in/k]
                if x.dtype != torch.float32:  # CPU bf16 bmm on this strided view is ~6x slower than the copy
                    x_blocks = x_blocks.contiguous()
                grad_Ac = torch.bmm(x_blocks.transpose(1, 2), grad_h)  # [k, in/k, r+hr]
                grad_A = grad_Ac[..., :r]
                if hr:
                    grad_A_g = grad_Ac[..., r:].permute(2, 0, 1).reshape(hr, k * i)
            if ctx.needs_input_grad[1]:
                grad_x = x.new_empty(M, k * i)
                # beta=0: the uninitialised buffer is ignored; written in place, no transpose copy
                grad_x.view(M, k, i).transpose(0, 1).baddbmm_(grad_h, A.transpose(1, 2), beta=0)
        return grad, grad_x, grad_A, grad_B, grad_A_g, grad_B_g, None, None


def _block_update_out_of_place(result, x, A, B, A_g, B_g, scaling, dtype):
    """`_BlockUpdate`'s result with plain autograd ops and no in-place write, for torch.compile:
    AOTAutograd cannot functionalize an in-place add into a transposed view of a dirtied input,
    and inductor fuses the add itself."""
    k, i, r = A.shape
    o, M, t = B.shape[2], x.shape[0], r // k
    x = x.to(dtype)
    h = torch.bmm(x.view(M, k, i).transpose(0, 1), A.to(dtype))  # [k (n), M, r]
    g = h.view(k, M, k, t).transpose(0, 2).reshape(k, M, r)  # [k (j), M, n·t]
    update = torch.bmm(g, B.to(dtype)).transpose(0, 1).reshape(M, k * o)
    if A_g is not None:
        update = update + (x @ A_g.to(dtype).t()) @ B_g.to(dtype).t()
    return result + (scaling * update).to(result.dtype)


class GraloraLinear(PeftGraloraLinear):
    def base_scaling(self, adapter: str) -> float:
        """alpha / (r + hybrid_r): the scaling at strength 1."""
        return self.alpha[adapter] / (self.r[adapter] + self.hybrid_r[adapter])

    def assign_scaling(self, adapter: str, value: float) -> None:
        """A float scaling is replaced; a tensor one (hot-swap) is filled in place, so a compiled graph,
        which reads it as an input, sees the new value without recompiling (PEFT's `_update_scaling`)."""
        current = self.scaling[adapter]
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        else:
            self.scaling[adapter] = value

    def scaling_to_tensor(self, adapter: str) -> None:
        """Keep this adapter's scaling in a 0-d tensor from now on (on the adapter's device)."""
        if not isinstance(self.scaling[adapter], torch.Tensor):
            self.scaling[adapter] = torch.tensor(float(self.scaling[adapter]), device=self.gralora_A[adapter].device)

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the adapter's strength: scaling = scale * alpha / (r + hybrid_r)."""
        if adapter not in self.scaling:
            return
        self.assign_scaling(adapter, scale * self.base_scaling(adapter))

    def scale_layer(self, scale: float) -> None:
        """Multiply the current scaling of every active adapter by `scale`."""
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self.gralora_A:
                self.assign_scaling(adapter, self.scaling[adapter] * scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo `scale_layer(scale)`; with `scale=None` reset to the strength-1 scaling."""
        for adapter in self.active_adapters:
            if adapter not in self.gralora_A:
                continue
            if scale is None:
                self.assign_scaling(adapter, self.base_scaling(adapter))
            else:
                self.assign_scaling(adapter, self.scaling[adapter] / scale)

    def forward(self, x: torch.Tensor, *args, adapter_names: list | None = None, **kwargs) -> torch.Tensor:
        """PEFT's forward (disable/merged handling, active adapters, dtype casts, one dropout
        call per branch in PEFT's order), with the update accumulated in place into the result.
        Under autocast the update is computed in autocast's dtype and the base output's dtype kept.

        `adapter_names`: one adapter name per sample of `x` (its first dimension; None or "__base__"
        for none), as PEFT's LoRA layer takes it: the active adapters are then ignored and each sample
        gets its own adapter's update; a name this layer does not carry counts as none. Without grad,
        adapters of one k share two batched matmuls, each sample with its adapter's gathered factors
        (`_gathered_update`); otherwise each run of consecutive samples with the same adapter gets that
        adapter's update in place, as PEFT's `_mixed_batch_forward` groups rows per adapter."""
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        if self.merged:
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        if adapter_names is not None and len(adapter_names) != x.shape[0]:
            raise ValueError(f"{getattr(self, 'module_name', type(self).__name__)}: {len(adapter_names)} adapter names "
                             f"for a batch of {x.shape[0]}; give one name per sample.")
        shape = (*x.shape[:-1], self.out_features)
        if type(self.base_layer) is nn.Linear and not args and not kwargs:
            # On rows, the Linear's output is no view (on [B, L, in] it is one), so the in-place
            # update needs no CopySlices node, which would copy the full-size gradient in backward.
            x = x.reshape(-1, self.in_features)
            result = self.base_layer(x)
        else:
            result = self.base_layer(x, *args, **kwargs).contiguous()
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:
            previous_dtype = result.dtype
        rows = result.numel() // self.out_features
        x = x.reshape(rows, self.in_features)
        if adapter_names is None:
            for adapter in self.active_adapters:
                if adapter in self.gralora_A:
                    result = self._add_update(result, x, adapter, autocast)
            return result.view(shape).to(previous_dtype)
        per_sample = rows // len(adapter_names) if adapter_names else 0
        present = [a for a in dict.fromkeys(adapter_names) if a in self.gralora_A]
        if len(present) > 1 and not torch.is_grad_enabled() and self._stackable(present):
            return self._gathered_update(result, x, adapter_names, present, autocast).view(shape).to(previous_dtype)
        start = 0
        for end in range(1, len(adapter_names) + 1):
            if end < len(adapter_names) and adapter_names[end] == adapter_names[start]:
                continue
            adapter, rows_ = adapter_names[start], slice(start * per_sample, end * per_sample)
            if adapter in self.gralora_A:  # None / "__base__" / not here: the base output as it is
                view = result[rows_]
                updated = self._add_update(view, x[rows_], adapter, autocast)
                if updated is not view:  # the compile path's out-of-place update
                    result = torch.cat((result[: rows_.start], updated, result[rows_.stop :]))
            start = end
        return result.view(shape).to(previous_dtype)

    def _stackable(self, adapters: list[str]) -> bool:
        """One k and dtype, no dropout acting: one batched product can serve these adapters (ranks may differ)."""
        first = adapters[0]
        return all(self.gralora_k[a] == self.gralora_k[first] and self.gralora_A[a].dtype == self.gralora_A[first].dtype
                   and (isinstance(self.gralora_dropout[a], nn.Identity) or not self.gralora_dropout[a].training)
                   for a in adapters)

    def _gathered_update(self, result, x, adapter_names, present, autocast) -> torch.Tensor:
        """result[S·L, out] + each sample's own adapter's update, for adapters of one k: their factors laid
        side by side at the largest rank (each rank slice zero-padded, which adds nothing), scaling folded
        into B, a zero slot for samples without adapter, and gathered per sample, so the k-block products
        of every group run as two batched matmuls in all, not two per group."""
        S, k = len(adapter_names), self.gralora_k[present[0]]
        L, i, o = x.shape[0] // S, self.in_features // k, self.out_features // k
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.gralora_A[present[0]].dtype
        A, B, A_g, B_g = self._side_by_side(present, dtype)
        T = A.shape[-1]
        slot = {a: n for n, a in enumerate(present)}
        index = torch.tensor([slot.get(a, len(present)) for a in adapter_names], device=x.device)
        x = x.to(dtype)
        h = torch.bmm(x.view(S, L, k, i).transpose(1, 2).reshape(S * k, L, i), A[index].view(S * k, i, k * T))  # [S·k (n), L, k·T]
        g = h.view(S, k, L, k, T).permute(0, 3, 2, 1, 4).reshape(S * k, L, k * T)  # [S·k (j), L, n·T]
        update = torch.bmm(g, B[index].view(S * k, k * T, o)).view(S, k, L, o).transpose(1, 2).reshape(S, L, k * o)
        if A_g is not None:
            update.baddbmm_(torch.bmm(x.view(S, L, k * i), A_g[index].transpose(1, 2)), B_g[index])
        return result.add_(update.view(S * L, k * o).to(result.dtype))

    def _side_by_side(self, present: list[str], dtype) -> tuple:
        """The adapters' factors in one tensor each, at the largest rank (each rank slice zero-padded) with
        scaling folded into B, plus a zero slot: A [U+1, k, in/k, k, T], B [U+1, k, k, T, out/k], hybrid
        A_g [U+1, hr, in], B_g [U+1, hr, out] (None without hybrid). Kept for the next call (the timesteps of
        one image) while the adapters, their tensors' versions and scalings are the same."""
        compiling = torch.compiler.is_compiling()  # a compiled graph lays them out itself, no cache
        if not compiling:
            scalings = tuple(s._version if isinstance(s, torch.Tensor) else s for s in (self.scaling[a] for a in present))
            key = (tuple(present), dtype, scalings, tuple(p._version for a in present for p in self._factors(a)))
            cached = getattr(self, "_side_by_side_cache", None)
            if cached is not None and cached[0] == key:
                return cached[1]
        U, k = len(present), self.gralora_k[present[0]]
        i, o = self.in_features // k, self.out_features // k
        T, hr = max(self.gralora_A[a].shape[2] for a in present) // k, max(self.hybrid_r[a] for a in present)
        ref = self.gralora_A[present[0]]
        A = ref.new_zeros(U + 1, k, i, k, T, dtype=dtype)  # [adapter, n, in/k, j, T]
        B = ref.new_zeros(U + 1, k, k, T, o, dtype=dtype)  # [adapter, j, n, T, out/k]
        A_g = B_g = None
        if hr:
            A_g, B_g = ref.new_zeros(U + 1, hr, k * i, dtype=dtype), ref.new_zeros(U + 1, hr, k * o, dtype=dtype)
        with torch.no_grad():  # inference only: with grad on, `forward` takes the per-group path
            for n, a in enumerate(present):
                t = self.gralora_A[a].shape[2] // k
                A[n, ..., :t] = self.gralora_A[a].view(k, i, k, t)
                B[n, :, :, :t] = (self.gralora_B[a] * self.scaling[a]).view(k, k, t, o)
                if self.hybrid_r[a]:
                    A_g[n, : self.hybrid_r[a]] = self.gralora_A_general[a].weight
                    B_g[n, : self.hybrid_r[a]] = (self.gralora_B_general[a].weight * self.scaling[a]).t()
        if not compiling:
            self._side_by_side_cache = (key, (A, B, A_g, B_g))
        return A, B, A_g, B_g

    def _factors(self, adapter: str) -> list[torch.Tensor]:
        hybrid = [self.gralora_A_general[adapter].weight, self.gralora_B_general[adapter].weight] if self.hybrid_r[adapter] else []
        return [self.gralora_A[adapter], self.gralora_B[adapter], *hybrid]

    def _add_update(self, result: torch.Tensor, x: torch.Tensor, adapter: str, autocast: bool) -> torch.Tensor:
        """result[rows, out] + one adapter's update of x[rows, in]: in place (the same tensor back),
        or out of place under torch.compile."""
        block_update = _block_update_out_of_place if torch.compiler.is_compiling() else _BlockUpdate.apply
        A, B, scaling = self.gralora_A[adapter], self.gralora_B[adapter], self.scaling[adapter]
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else A.dtype
        dropout = self.gralora_dropout[adapter]
        if isinstance(dropout, nn.Identity) or not dropout.training:  # no call, no cast, same values
            xd = xh = x
        else:  # PEFT's order: one dropout call per branch, on the input cast to the adapter's dtype
            xd = dropout(x.to(A.dtype))
            xh = dropout(x.to(A.dtype)) if self.hybrid_r[adapter] else xd
        if self.hybrid_r[adapter] > 0 and xh is not xd:
            result = block_update(result, xd, A, B, None, None, scaling, dtype)
            # Hybrid on its own dropout mask: the k = 1 case, on the weights of PEFT's two Linears.
            A_g = self.gralora_A_general[adapter].weight.t().unsqueeze(0)  # [1, in, hybrid_r]
            B_g = self.gralora_B_general[adapter].weight.t().unsqueeze(0)  # [1, hybrid_r, out]
            return block_update(result, xh, A_g, B_g, None, None, scaling, dtype)
        A_g = B_g = None
        if self.hybrid_r[adapter] > 0:
            A_g, B_g = self.gralora_A_general[adapter].weight, self.gralora_B_general[adapter].weight
        return block_update(result, xd, A, B, A_g, B_g, scaling, dtype)
