"""One elastic LoRA adapter on one linear layer: the maths of a super-adapter.

The super-adapter holds ``lora_A`` (r_max, in) and ``lora_B`` (out, r_max). A sub-adapter of
rank ``r`` is the prefix slice ``A[:r, :]``, ``B[:, :r]``, and it keeps the super-adapter's
scaling ``alpha / r_max``: it is a slice, not a re-scaled LoRA of its own (DESIGN.md).

State-dict format: the base layer's tensors are saved under the module's own names
(``<module>.weight``, ``<module>.bias``, as in the model without adapters), next to
``<module>.lora_A``, ``<module>.lora_B`` and ``<module>.lora_active_rank`` (a 0-d int64).
So ``save_pretrained`` of an adapted model writes a checkpoint whose base plain
``from_pretrained`` loads, and the adapter keys are the only ones it skips.

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
import warnings
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from shears.quantization import check_scales, grid_of, qa_linear
from shears.quantization.bnb import (
    check_bnb_layer,
    dequantized_weight,
    is_bnb_4bit,
    keep_trainable_layout,
)

BASE = "base_layer."
ACTIVE_RANK_KEY = "lora_active_rank"
RANK_MODES = ("slice", "mask")
DENSE_OVER_GRID = (
    "sparse_adapter=False over a base quantized by quantize_base: this adapter trains as plain "
    "LoRA over the dequantized grid, not quantization-aware, and a dense update cannot be "
    "merged onto the grid: merge_adapters would leave this map off the grid (and forget its "
    "grid). Pass sparse_adapter=True for QA-SparsePEFT, or keep the adapter unmerged.")


def validate_ranks(ranks: Sequence[int], max_rank: int | None = None) -> tuple[int, ...]:
    """Check a rank list and return it in descending order, as plain Python ints.

    ``ranks`` is a sized iterable (list, tuple, 1-D numpy array) of integral values (Python
    or numpy ints; not bools, not floats, even 16.0). No duplicates and, when ``max_rank``
    is given (the smaller side of the weight), none larger than it.
    """
    if isinstance(ranks, (str, bytes, Integral)) or not hasattr(ranks, "__len__") \
            or len(ranks) == 0:
        raise ValueError(f"ranks must be a non-empty list of positive ints, got {ranks!r}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, Integral) or r <= 0:
            raise ValueError(f"ranks must be positive ints, got {r!r} in {list(ranks)}")
    ints = [int(r) for r in ranks]  # numpy ints -> int: JSON metadata, exact comparisons
    if len(set(ints)) != len(ints):
        raise ValueError(f"ranks must not repeat, got {ints}")
    out = tuple(sorted(ints, reverse=True))
    if max_rank is not None and out[0] > max_rank:
        raise ValueError(f"r_max={out[0]} exceeds min(in_features, out_features)={max_rank}")
    return out


def check_alpha_dropout(alpha: float, dropout: float) -> None:
    """Refuse an ``alpha`` that is not a finite number > 0 (0 learns nothing; NaN or inf
    makes every output NaN) and a ``dropout`` outside [0, 1) (1 drops every input)."""
    for name, value in (("alpha", alpha), ("dropout", dropout)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} "
                            f"{value!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not 0 <= dropout < 1:  # False for NaN too
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a plain bool; ``TypeError`` for anything else ("no", 0, None): a flag
    read by truthiness would take ``"no"`` for True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def layer_features(base_layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear map, read from the layer, not from its
    weight's shape: GPT-2's ``Conv1D`` stores (in, out), and a bitsandbytes ``Linear4bit``
    stores a packed (out * in / 2, 1) uint8 weight."""
    if isinstance(base_layer, Conv1D):  # GPT-2 style: weight is (in, out)
        return tuple(base_layer.weight.shape)
    if isinstance(base_layer, nn.Linear):  # Linear4bit too: it subclasses nn.Linear
        return base_layer.in_features, base_layer.out_features
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(base_layer).__name__}")


class ElasticLoRALinear(nn.Module):
    """A frozen linear layer plus an elastic low-rank update (one super-adapter).

    ``forward(x) = base_layer(x) + scaling * dropout(x) @ A[:r].T @ B[:, :r].T`` with
    ``scaling = alpha / r_max`` for every active rank ``r``.

    Args:
        base_layer: ``nn.Linear`` (weight (out, in)), transformers' ``Conv1D``
            (weight (in, out)) or a bitsandbytes ``Linear4bit`` (NF4/FP4, packed; the 4-bit
            base runs as is and the adapter adds its update in fp32, QLoRA-style); kept as
            ``self.base_layer`` and frozen.
        ranks: the ranks a sub-adapter may take; stored in descending order.
        alpha: LoRA alpha, a finite number > 0; the scaling is ``alpha / max(ranks)``.
        dropout: dropout probability on the adapter's input, in [0, 1).
        sparse_adapter: multiply the update by the base weight's non-zero mask (SparsePEFT,
            as in SQFT) so that merging the adapter keeps the base's zeros exactly. Over a
            base quantized by ``quantize_base`` it also trains quantization-aware
            (QA-SparsePEFT): the forward uses the grid point of ``W + delta * (W != 0)``
            on the base's own scales, with a straight-through gradient
            (``shears.quantization.qa_linear``); ``False`` there warns (``DENSE_OVER_GRID``).
        group: the search-space group whose rank variable this adapter follows
            (set by ``add_elastic_lora``; ``None`` means the module is its own group).
        rank_mode: ``"slice"`` (default; prefix views, least work per rank) or ``"mask"``
            (static shapes for ``torch.compile``: the work of r_max at every rank, one
            graph for all configurations). Settable later; the maths do not change.

    ``lora_A`` (r_max, in) and ``lora_B`` (out, r_max) are created in fp32 on the base
    layer's device, whatever the base dtype. They are ordinary parameters: a later
    ``model.to(torch.bfloat16)`` casts them as well (as it does PEFT's LoRA weights), and
    ``forward`` then computes the update in bf16. Mixed precision with fp32 adapters over a
    bf16 base: cast the base before ``add_elastic_lora``, or use autocast.
    """

    #: Instances constructed so far in this process. A cached ``ElasticIndex`` compares it
    #: with the count at its walk, to notice adapters attached after it was built.
    constructed = 0

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
        check_alpha_dropout(alpha, dropout)  # before the base layer is frozen below
        sparse_adapter = check_flag("sparse_adapter", sparse_adapter)
        if sparse_adapter:  # QA-SparsePEFT: a NaN/zero scale would round the map to NaN
            check_scales(type(base_layer).__name__, base_layer)
        self.in_features, self.out_features = layer_features(base_layer)
        if is_bnb_4bit(base_layer):
            check_bnb_layer(base_layer, type(base_layer).__name__)
        self.ranks = validate_ranks(ranks, min(self.in_features, self.out_features))
        if is_bnb_4bit(base_layer):  # QLoRA-style: keep the layout backward can go through
            keep_trainable_layout(base_layer)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.r_max = self.ranks[0]
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r_max
        self.sparse_adapter = sparse_adapter
        if grid_of(base_layer) is not None and not self.sparse_adapter:
            warnings.warn(DENSE_OVER_GRID, UserWarning, stacklevel=2)
        self.group = group
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Created on the base layer's device in fp32, whatever the base's or torch's default
        # dtype (as PEFT's autocast_adapter_dtype). Like any parameter, a later
        # ``model.to(dtype)`` casts them too; forward then computes the update in that dtype.
        kw = dict(device=base_layer.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(self.r_max, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r_max, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's default init
        self._active_rank = self.r_max
        self._rank_mode = "slice"
        self.rank_mode = rank_mode
        # Plain functions, not bound methods: copy.deepcopy and pickle carry them over, and the
        # copy's hooks act on the copy (torch passes the module in).
        self.register_state_dict_post_hook(_save_base_under_own_names)
        self.register_load_state_dict_pre_hook(_load_base_from_own_names)
        ElasticLoRALinear.constructed += 1

    @property
    def active_rank(self) -> int:
        """Rank of the sub-adapter used by ``forward``; one of ``self.ranks``."""
        return self._active_rank

    @active_rank.setter
    def active_rank(self, rank: int) -> None:
        if rank not in self.ranks:
            raise ValueError(f"rank {rank!r} is not in this adapter's ranks {list(self.ranks)}")
        # A plain int: object.__setattr__ skips nn.Module's parameter/buffer/module
        # bookkeeping, which costs more than the rest of a configuration switch.
        object.__setattr__(self, "_active_rank", int(rank))
        if self._rank_mode == "mask":
            self._write_rank_mask()

    @property
    def lora_active_rank(self) -> torch.Tensor:
        """The active rank as the 0-d int64 tensor the state dict carries (see the hooks).

        An attribute of that name lets code that resolves state-dict keys by ``getattr``
        (``torch.distributed.checkpoint``'s ``get_model_state_dict``, used by FSDP2
        checkpoints) find it."""
        return torch.tensor(self._active_rank, dtype=torch.int64)

    def _fqn_modifiers(self) -> dict[str, str]:
        """``torch.distributed.checkpoint``'s hook for renamed state-dict keys: the base
        layer's tensors appear as ``<module>.weight``/``.bias``, held by ``base_layer``."""
        base = self.base_layer
        names = [*base._parameters, *(b for b in base._buffers
                                      if b not in base._non_persistent_buffers_set)]
        return dict.fromkeys(names, "base_layer")


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

    def _apply(self, fn, recurse=True):
        """After ``to``/``cuda``/``to_empty``: rewrite the mask, which no state dict restores
        (``to_empty`` after meta-device initialisation leaves it uninitialised)."""
        module = super()._apply(fn, recurse)
        mask = self._buffers.get("rank_mask")
        if mask is not None and not mask.is_meta:
            self._write_rank_mask()
        return module

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the layer type: a view, no copy, except
        over a bitsandbytes 4-bit base, whose weight is dequantized (a new tensor, in the
        dtype the layer was quantized from)."""
        if is_bnb_4bit(self.base_layer):
            return dequantized_weight(self.base_layer)
        w = self.base_layer.weight
        return w.t() if isinstance(self.base_layer, Conv1D) else w

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """The (out, in) update ``scaling * B[:, :r] @ A[:r]`` in the adapters' dtype (fp32
        unless cast), masked if sparse_adapter."""
        r = self._active_rank if rank is None else rank
        if r not in self.ranks:
            raise ValueError(f"rank {r!r} is not in this adapter's ranks {list(self.ranks)}")
        delta = (self.lora_B[:, :r] @ self.lora_A[:r]) * self.scaling
        if self.sparse_adapter:
            delta = delta * (self.base_weight() != 0)
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out) in the base layer's output dtype."""
        if self._rank_mode == "mask":
            # Rows r.. of A become exact zeros, so their terms in B @ A vanish and both they
            # and B's columns r.. get exactly zero gradient; every shape stays (r_max, ...).
            a, b = self.lora_A * self.rank_mask[:, None], self.lora_B
        else:
            r = self._active_rank
            a, b = self.lora_A[:r], self.lora_B[:, :r]  # views: no copy of the super-adapter
        grid = grid_of(self.base_layer) if self.sparse_adapter else None
        if grid is not None:  # QA-SparsePEFT (SQFT): the merged weight on the base's grid
            return qa_linear(self.dropout(x.to(a.dtype)), self.base_layer, self.base_weight(),
                             (b @ a) * self.scaling, grid)
        result = self.base_layer(x)  # not needed on the grid: the QA weight replaces it
        x = self.dropout(x.to(a.dtype))
        if self.sparse_adapter:
            # The mask must act on the product B @ A, so the (out, in) update is materialised;
            # recomputing the mask each call keeps it right if the base is pruned later, and
            # over a 4-bit base costs one dequantization per call instead of a cached bool
            # mask 1.8x the size of the NF4 weight it masks (docs/quantization.md).
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


def _own_names(module: nn.Module) -> set[str]:
    """First name components that belong to the adapter itself, not to its base layer:
    its parameters and buffers (``lora_A``, ``lora_B``, any added later), its children
    (``base_layer``, ``dropout``) and the active rank."""
    return {*module._parameters, *module._buffers, *module._modules, ACTIVE_RANK_KEY}


def _save_base_under_own_names(
    module: ElasticLoRALinear, state_dict: dict[str, Any], prefix: str, local_metadata: dict
) -> None:
    """State-dict post-hook: ``<prefix>base_layer.weight`` -> ``<prefix>weight`` (and bias).

    Torch saves a module's own tensors, then its children's, then runs this hook, so the
    base layer's entries are already in ``state_dict``. The active rank is added as a 0-d
    int64 tensor so that every checkpoint (``save_pretrained``, Trainer) records it.
    """
    own = _own_names(module)
    for key in [k for k in state_dict if k.startswith(prefix + BASE)]:
        name = key[len(prefix + BASE):]
        if name.split(".", 1)[0] in own or prefix + name in state_dict:  # never clobber
            raise ValueError(f"{key}: the base layer's {name!r} collides with the adapter's")
        state_dict[prefix + name] = state_dict.pop(key)
    state_dict[prefix + ACTIVE_RANK_KEY] = module.lora_active_rank


def _load_base_from_own_names(
    module: ElasticLoRALinear,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook, the inverse of the post-hook; runs before the children load.

    ``<prefix>weight`` -> ``<prefix>base_layer.weight``; the old layout (``base_layer.`` names,
    no active rank) still loads. ``<prefix>lora_active_rank``, when present, sets the rank.
    """
    own = _own_names(module)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix):]
        if name.split(".", 1)[0] in own:
            continue
        if prefix + BASE + name in state_dict:
            error_msgs.append(f"both {key} and {prefix + BASE + name} are given; keep one")
            continue
        state_dict[prefix + BASE + name] = state_dict.pop(key)
    rank = state_dict.pop(prefix + ACTIVE_RANK_KEY, None)
    if rank is None:
        return  # a checkpoint from before the active rank was saved: keep the current one
    rank = int(rank)
    if rank in module.ranks:
        module.active_rank = rank
    else:
        error_msgs.append(f"{prefix + ACTIVE_RANK_KEY}: rank {rank} is not in {list(module.ranks)}")
