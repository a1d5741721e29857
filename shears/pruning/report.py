"""Sparsity and parameter report: what was pruned, and what the model now holds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .layers import find_decoder_blocks, linear_modules, weight_matrix
from .packed import dequantize_4bit, is_bnb_4bit


@dataclass
class ModuleSparsity:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    zeros: int
    numel: int
    target: float | None = None  # the sparsity wanda_prune was asked to give this map

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Per prunable module: name, (out, in) shape, zeros and sparsity; plus model totals.

    Attributes:
        modules: one :class:`ModuleSparsity` per reported linear map.
        total_parameters: every parameter of the model (adapters included).
        nonzero_parameters: its non-zero entries.
        adapter_parameters: trainable adapter parameters (``lora_*``), 0 before stage 2.
        allocation: from ``wanda_prune``, {decoder-block index: sparsity} when the maps of
            each block were given one sparsity (uniform, OWL, a per-block mapping); None
            otherwise. Passed back as ``sparsity=`` it gives the same masks.
        outlier_ratios: from ``wanda_prune(allocation="owl")``, {block index: D_l}, the
            share of the block's scores above ``owl_threshold`` times their mean.
    """

    modules: list[ModuleSparsity]
    total_parameters: int
    nonzero_parameters: int
    adapter_parameters: int = 0
    extra: dict = field(default_factory=dict)
    allocation: dict[int, float] | None = None
    outlier_ratios: dict[int, float] | None = None

    @property
    def sparsity(self) -> float:
        """Zeros over entries of the reported modules together."""
        numel = sum(m.numel for m in self.modules)
        return sum(m.zeros for m in self.modules) / numel if numel else 0.0

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "total_parameters": self.total_parameters,
            "nonzero_parameters": self.nonzero_parameters,
            "adapter_parameters": self.adapter_parameters,
            "modules": [dict(asdict(m), shape=list(m.shape), sparsity=m.sparsity)
                        for m in self.modules],
            "allocation": self.allocation,
            "outlier_ratios": self.outlier_ratios,
            **self.extra,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        width = max([len(m.name) for m in self.modules] + [6])
        targets = any(m.target is not None for m in self.modules)
        lines = [f"{'module':<{width}}  {'shape':>12}  {'zeros':>10}  {'sparsity':>8}"
                 + (f"  {'target':>8}" if targets else "")]
        for m in self.modules:
            shape = f"{m.shape[0]}x{m.shape[1]}"
            target = "" if not targets else (
                f"  {m.target:>8.2%}" if m.target is not None else f"  {'':>8}")
            lines.append(f"{m.name:<{width}}  {shape:>12}  {m.zeros:>10}  {m.sparsity:>8.2%}"
                         + target)
        lines += [
            f"pruned modules: {len(self.modules)}, overall sparsity {self.sparsity:.2%}",
            f"parameters: {self.total_parameters:,} total, {self.nonzero_parameters:,} non-zero"
            f" ({self.nonzero_parameters / max(self.total_parameters, 1):.2%})",
            f"adapter parameters: {self.adapter_parameters:,}",
        ]
        return "\n".join(lines)


def _counts_4bit(model: nn.Module) -> dict[str, tuple[tuple[int, int], int]]:
    """Module name -> ((out, in), zeros) of every bitsandbytes 4-bit map, read from its
    dequantized weight (the stored one is packed codes, (out * in / 2, 1) uint8), one map at
    a time so that no more than one fp copy exists at once."""
    counts = {}
    for name, m in model.named_modules():
        if is_bnb_4bit(m):
            w = dequantize_4bit(m, name)
            counts[name] = (tuple(w.shape), int((w == 0).sum()))
    return counts


@torch.no_grad()
def sparsity_report(model: nn.Module, modules: list[str] | None = None) -> SparsityReport:
    """Report the sparsity of ``modules`` (a list of qualified names; default: every linear
    map of the decoder blocks) and the model's parameter totals.

    A bitsandbytes 4-bit map is reported as its dequantized (out, in) weight (NF4 keeps every
    pruned zero, and adds those of small weights rounded to its zero code), and counted so in
    the totals; one repacked for bitsandbytes' CPU inference kernel is refused
    (``ValueError``): report it before its first eval forward, or on the fp checkpoint.
    """
    if isinstance(modules, (str, bytes)):
        raise TypeError(f"modules must be a list of qualified names, got the string "
                        f"{modules!r} (wrap it: [{modules!r}])")
    packed = _counts_4bit(model)
    if modules is None:
        prefix, blocks = find_decoder_blocks(model)
        table = {}
        for i, block in enumerate(blocks):
            table.update(linear_modules(block, f"{prefix}.{i}"))
    else:
        named = dict(model.named_modules())
        missing = [n for n in modules if n not in named]
        if missing:
            raise KeyError(f"no such modules: {missing}")
        table = {n: named[n] for n in modules}
    rows = []
    for name, module in table.items():
        if name in packed:
            shape, zeros = packed[name]
            rows.append(ModuleSparsity(name, shape, zeros, shape[0] * shape[1]))
            continue
        w = weight_matrix(module)
        rows.append(ModuleSparsity(name, tuple(w.shape), int((w == 0).sum()), w.numel()))
    params = list(model.named_parameters())  # skips tied duplicates (embeddings = lm_head)
    total = nonzero = 0
    for n, p in params:
        owner, _, leaf = n.rpartition(".")
        if leaf == "weight" and owner in packed:  # packed codes: count the (out, in) weight
            shape, zeros = packed[owner]
            total += shape[0] * shape[1]
            nonzero += shape[0] * shape[1] - zeros
        else:
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return SparsityReport(
        modules=rows,
        total_parameters=total,
        nonzero_parameters=nonzero,
        adapter_parameters=sum(p.numel() for n, p in params if "lora_" in n and p.requires_grad),
    )
