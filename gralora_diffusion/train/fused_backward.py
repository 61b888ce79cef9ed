"""`--fused_backward_pass`: each adapter weight takes its optimizer step inside backward, as soon as its
gradient is complete, and the gradient is freed at once, so the adapter's gradients never all exist
together (kohya sd-scripts' option of the same name; PyTorch's `register_post_accumulate_grad_hook`
recipe). Peak memory loses the size of the adapter's gradients: one fp32 copy of the adapter.

One optimizer keeps the state, the learning rates and the checkpoint as without the option: each weight
gets a one-weight optimizer of the same class that shares that state (`Optimizer.state` is keyed by the
weight) and copies its group's hyperparameters (the schedule's lr) at every step. AdamW steps each
weight alone anyway, so the result is the unfused one's, bit for bit, when gradients are not clipped;
`--max_grad_norm` then clips each weight's gradient on its own (kohya's rule), since no global norm
exists before the last gradient.

Needs one process, no gradient accumulation, no fp16 loss scaling and a per-weight optimizer (AdamW):
`check_fusable_backward` says which, before any model loads.
"""

from __future__ import annotations

# torch is imported inside the function: the CLI's parser reads TrainConfig, which checks flags from here, cheaply.
PER_WEIGHT_OPTIMIZERS = ("adamw",)  # prodigy estimates one step size from every weight; bitsandbytes' 8-bit state is its own


def check_fusable_backward(cfg, num_processes: int, error) -> None:
    """Refuse, in one line naming the conflicting flag, what a per-weight step inside backward cannot do."""
    if not cfg.fused_backward_pass:
        return
    conflicts = {
        "--gradient_accumulation_steps": (cfg.gradient_accumulation_steps != 1, "a weight steps as soon as its gradient exists; set it to 1"),
        "--optimizer": (cfg.optimizer not in PER_WEIGHT_OPTIMIZERS, f"{cfg.optimizer} does not step one weight at a time; use adamw"),
        "--mixed_precision": (cfg.mixed_precision == "fp16", "fp16 loss scaling unscales every gradient at once; use bf16"),
        "processes": (num_processes != 1, f"{num_processes} processes average gradients after backward; run one process"),
    }
    for flag, (bad, why) in conflicts.items():
        if bad:
            raise error(f"--fused_backward_pass with {flag}: {why}, or drop --fused_backward_pass.")


def fuse_optimizer_into_backward(optimizer, max_grad_norm: float = 0.0) -> list:
    """Step `optimizer` (a torch optimizer) one weight at a time during backward (see the module). Returns the hook handles."""
    import torch

    handles = []
    for index, group in enumerate(optimizer.param_groups):
        for weight in group["params"]:
            if not weight.requires_grad:
                continue
            alone = type(optimizer)([weight])  # its hyperparameters are the group's, copied at each step

            def step(w, alone=alone, index=index):
                if max_grad_norm:  # clip_grad_norm_([w], max_grad_norm)'s arithmetic, without its list machinery (3x the time)
                    w.grad.mul_(torch.clamp(max_grad_norm / (torch.linalg.vector_norm(w.grad, 2) + 1e-6), max=1.0))
                # read at every step: load_state_dict (a resume) gives the optimizer new state and group dicts
                alone.state = optimizer.state
                alone.param_groups[0].update({k: v for k, v in optimizer.param_groups[index].items() if k != "params"})
                alone.step()
                w.grad = None

            handles.append(weight.register_post_accumulate_grad_hook(step))
    return handles
