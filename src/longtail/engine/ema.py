"""Exponential moving average of a method's weights (``stages[].ema.decay``), evaluated as its own variant.

After every optimiser step ``ema = decay * ema + (1 - decay) * w`` for each floating-point tensor of the method's
state (parameters and buffers: BN statistics, a method's running state); integer buffers (BN's
``num_batches_tracked``) are copied. Non-tensor entries (a module's extra state) are left out: the EMA variant
takes them from the trained method. Reads the weights only: training is unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """The EMA of ``method``'s state tensors, started from their current values."""

    def __init__(self, method: nn.Module, decay: float) -> None:
        self.decay = decay
        live = {k: v for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
        self.state = {k: v.detach().clone() for k, v in live.items()}
        # load_state_dict copies into these same tensors, so the pairs stay valid after a resume's load
        self._float = [(self.state[k], v) for k, v in live.items() if v.is_floating_point()]
        self._other = [(self.state[k], v) for k, v in live.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self._float:
            torch._foreach_lerp_([e for e, _ in self._float], [v for _, v in self._float], 1.0 - self.decay)
        for e, v in self._other:
            e.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, e in self.state.items():
            e.copy_(state[k])

    def averaged(self, method: nn.Module) -> nn.Module:
        """A copy of ``method`` holding the EMA weights (in eval mode), for evaluation."""
        out = copy.deepcopy(method)
        out.load_state_dict(self.state, strict=False)  # strict=False: extra state stays the method's
        return out.eval()
