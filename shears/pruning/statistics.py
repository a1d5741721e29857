"""The Wanda input statistic: per input channel, sum over tokens of x^2, in fp32."""

from __future__ import annotations

import torch
from torch import nn

from shears.pruning.layers import weight_matrix


class BlockDone(Exception):
    """Raised once every selected map of a block has seen its input: the rest of the block
    (e.g. the down projection) is not needed for statistics, so it is not computed."""


class InputStatistics:
    """Forward pre-hooks that accumulate sum_tokens x^2 per input channel of each map.

    Maps that share one input tensor (q/k/v, gate/up) reduce it once. Divide by the number
    of calibration sequences (:meth:`means`) to get the running mean of the reference code.
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, stop_early: bool):
        self.sums = {
            name: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float32, device=device)
            for name, m in modules.items()
        }
        self.stop_early = stop_early
        self.token_mask: torch.Tensor | None = None  # (b, seqlen) of the current batch
        self._pending: set[str] = set()
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def start_batch(self, token_mask: torch.Tensor | None) -> None:
        self.token_mask = token_mask
        self._pending = set(self.sums)
        self._last = (None, None)

    def _increment(self, x: torch.Tensor) -> torch.Tensor:
        """(in,) sum over this batch's real tokens of x^2 for input x (..., in)."""
        flat = x.reshape(-1, x.shape[-1])
        mask = self.token_mask
        if mask is not None and mask.numel() == flat.shape[0]:
            flat = flat * mask.reshape(-1, 1).to(flat.dtype)
        # the squared L2 norm, as the reference computes it; fp32 whatever the input dtype
        return torch.linalg.vector_norm(flat, ord=2, dim=0, dtype=torch.float32).square_()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            last_x, last_inc = self._last
            inc = last_inc if x is last_x else self._increment(x)
            self._last = (x, inc)
            self.sums[name] += inc
            self._pending.discard(name)
            if self.stop_early and not self._pending:
                raise BlockDone

        return hook

    def means(self, nsequences: int) -> dict[str, torch.Tensor]:
        return {name: s / nsequences for name, s in self.sums.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = (None, None)
