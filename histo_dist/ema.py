"""An exponential moving average of a model's weights, updated without host-device syncs.

torch's AveragedModel reads its update counter on the host (`bool(n_averaged == 0)`) and copies it to
the device at every update: two synchronisations per optimizer step on a GPU. Here the counter lives
on the host, the average is one fused `_foreach_lerp_` over the parameters and the floating-point
buffers (BatchNorm's running statistics), and integer buffers are copied.

Each rank updates its copy from its own model: the parameters agree across ranks (DDP), BatchNorm's
running statistics do not (each rank's come from its own batches). `broadcast_buffers` makes every
rank hold rank 0's before an evaluation, so that all ranks score one model, the one checkpointed.

The state dict keeps AveragedModel's layout (`module.<name>` and `n_averaged`), which checkpoints
and `checkpoint.model_weights` read.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0  # on the host: deciding "first update?" needs no device read

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in `model`'s current weights (the first update copies them)."""
        averaged, current = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        floats = [(averaged[k].detach(), v.detach()) for k, v in current.items() if v.is_floating_point()]
        others = [(averaged[k].detach(), v.detach()) for k, v in current.items() if not v.is_floating_point()]
        if self.updates == 0:
            torch._foreach_copy_([a for a, _ in floats], [c for _, c in floats])
        else:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - self.decay)
        for a, c in others:  # BatchNorm's batch counters
            a.copy_(c)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        state = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        state["n_averaged"] = torch.tensor(self.updates, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict({k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"})
        self.updates = int(state["n_averaged"])


def broadcast_buffers(module: nn.Module, world_size: int) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics) of `module`; a collective."""
    if world_size > 1:
        import torch.distributed as dist

        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
