"""One elastic LoRA adapter on one linear layer: the maths of a super-adapter.

The super-adapter holds ``lora_A`` (r_max, in) and ``lora_B`` (out, r_max). A sub-adapter of
rank ``r`` is the prefix slice ``A[:r, :]``, ``B[:, :r]``, and it keeps the super-adapter's
scaling ``alpha / r_max``: it is a slice, not a re-scaled LoRA of its own (DESIGN.md).

How the rank acts (``rank_mode``): ``"slice"`` takes the views ``A[:r]``, ``B[:, :r]``, so
smaller ranks do less work, but every rank is another tensor shape: ``torch.compile``
guards on the rank of every adapter and recompiles whenever one changes. ``"mask"`` keeps
the shapes static: ``A`` is multiplied by a (r_max,) 0/1 device mask whose first ``r``
entries are on, and the mask is rewritten in place when the rank changes (no host sync,
no new graph). Both compute the same function and give the same gradients; inactive rows
of ``A`` and columns of ``B`` get exactly zero gradient in both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

RANK_MODES = ("slice", "mask")


def validate_ranks(ranks: Sequence[int], max_rank: int | None = None) -> tuple[int, ...]:
    """Check a rank list and return it in descending order.

    Ranks must be positive ints without duplicates and, when ``max_rank`` is given (the
    smaller side of the weight), no larger than it.
    """
    if isinstance(ranks, (int, str)) or len(ranks) == 0:
        raise ValueError(f"ranks must be a non-empty list of positive ints, got {ranks!r}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"ranks must be positive ints, got {r!r} in {list(ranks)}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must not repeat, got {list(ranks)}")
    out = tuple(sorted(ranks, reverse=True))
    if max_rank is not None and out[0] > max_rank:
        raise ValueError(f"r_max={out[0]} exceeds min(in_features, out_features)={max_rank}")
    return out


class ElasticLoRALinear(nn.Module):
    """A frozen linear layer plus an elastic low-rank update (one super-adapter).

    ``forward(x) = base_layer(x) + scaling * dropout(x) @ A[:r].T @ B[:, :r].T`` with
    ``scaling = alpha / r_max`` for every active rank ``r``.

    Args:
        base_layer: ``nn.Linear`` (weight (out, in)) or transformers' ``Conv1D``
            (weight (in, out)); kept as ``self.base_layer`` and frozen.
        ranks: the ranks a sub-adapter may take; stored in descending order.
        alpha: LoRA alpha; the scaling is ``alpha / max(ranks)``.
        dropout: dropout probability on the adapter's input.
        sparse_adapter: multiply the update by the base weight's non-zero mask (SparsePEFT,
            as in SQFT) so that merging the adapter keeps the base's zeros exactly.
        group: the search-space group whose rank variable this adapter follows
            (set by ``add_elastic_lora``; ``None`` means the module is its own group).
        rank_mode: ``"slice"`` (default; prefix views, least work per rank) or ``"mask"``
            (static shapes for ``torch.compile``: the work of r_max at every rank, one
            graph for all configurations). Settable later; the maths do not change.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: Sequence[int] = (32, 24, 16),
        alpha: float = 64.0,
        dropout: float = 0.0,
        sparse_adapter: bool = False,
        group: str | None = None,
        rank_mode: str = "slice",
    ) -> None:
        super().__init__()
        if isinstance(base_layer, ElasticLoRALinear):
            raise ValueError("this layer already carries an elastic LoRA adapter")
        if isinstance(base_layer, Conv1D):  # GPT-2 style: weight is (in, out)
            self.in_features, self.out_features = base_layer.weight.shape
        elif isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            raise TypeError(f"expected nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.ranks = validate_ranks(ranks, min(self.in_features, self.out_features))
        self.r_max = self.ranks[0]
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r_max
        self.sparse_adapter = bool(sparse_adapter)
        self.group = group
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters follow the base layer's device and stay fp32 whatever the base dtype.
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r_max, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r_max, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's default init
        self._active_rank = self.r_max
        self._rank_mode = "slice"
        self.rank_mode = rank_mode

    @property
    def active_rank(self) -> int:
        """Rank of the sub-adapter used by ``forward``; one of ``self.ranks``."""
        return self._active_rank

    @active_rank.setter
    def active_rank(self, rank: int) -> None:
        if rank not in self.ranks:
            raise ValueError(f"rank {rank!r} is not in this adapter's ranks {list(self.ranks)}")
        self._active_rank = int(rank)
        if self._rank_mode == "mask":
            self._write_rank_mask()

    @property
    def rank_mode(self) -> str:
        """``"slice"`` or ``"mask"``: how the active rank acts in ``forward`` (module doc)."""
        return self._rank_mode

    @rank_mode.setter
    def rank_mode(self, mode: str) -> None:
        if mode not in RANK_MODES:
            raise ValueError(f"rank_mode must be one of {list(RANK_MODES)}, got {mode!r}")
        if mode == "mask" and "rank_mask" not in self._buffers:
            # Non-persistent: state dicts and saved adapters are the same in both modes.
            mask = torch.zeros(self.r_max, dtype=torch.bool, device=self.lora_A.device)
            self.register_buffer("rank_mask", mask, persistent=False)
        elif mode == "slice" and "rank_mask" in self._buffers:
            del self.rank_mask
        self._rank_mode = mode
        if mode == "mask":
            self._write_rank_mask()

    def _write_rank_mask(self) -> None:
        """rank_mask[:r] = True, the rest False: two in-place fills, no host sync."""
        with torch.no_grad():
            self.rank_mask.fill_(False)
            self.rank_mask[: self._active_rank].fill_(True)

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the layer type (a view, no copy)."""
        w = self.base_layer.weight
        return w.t() if isinstance(self.base_layer, Conv1D) else w

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """The (out, in) fp32 update ``scaling * B[:, :r] @ A[:r]`` (masked if sparse_adapter)."""
        r = self._active_rank if rank is None else rank
        if r not in self.ranks:
            raise ValueError(f"rank {r!r} is not in this adapter's ranks {list(self.ranks)}")
        delta = (self.lora_B[:, :r] @ self.lora_A[:r]) * self.scaling
        if self.sparse_adapter:
            delta = delta * (self.base_weight() != 0)
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out) in the base layer's output dtype."""
        result = self.base_layer(x)
        if self._rank_mode == "mask":
            # Rows r.. of A become exact zeros, so their terms in B @ A vanish and both they
            # and B's columns r.. get exactly zero gradient; every shape stays (r_max, ...).
            a, b = self.lora_A * self.rank_mask[:, None], self.lora_B
        else:
            r = self._active_rank
            a, b = self.lora_A[:r], self.lora_B[:, :r]  # views: no copy of the super-adapter
        x = self.dropout(x.to(a.dtype))
        if self.sparse_adapter:
            # The mask must act on the product B @ A, so the (out, in) update is materialised;
            # recomputing the mask each call keeps it right if the base is pruned later.
            update = F.linear(x, (b @ a) * (self.base_weight() != 0))
        else:
            update = F.linear(F.linear(x, a), b)  # two thin matmuls, never (out, in)
        return (result + update * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"ranks={list(self.ranks)}, active_rank={self._active_rank}, alpha={self.alpha}, "
            f"group={self.group!r}, sparse_adapter={self.sparse_adapter}, "
            f"rank_mode={self._rank_mode!r}"
        )
