"""Every group's and every rank's estimated loss change, from one backward pass per batch.

A sub-adapter of rank ``r`` is the prefix ``A[:r]``, ``B[:, :r]`` at the fixed scaling
``alpha / r_max``: in ``rank_mode="mask"`` the adapter computes ``B diag(m) A x`` with the
rank mask ``m`` (r_max,), ``m_i = 1`` for ``i < r``. Cutting group g from rank ``a`` to
``r < a`` switches ``m_r .. m_{a-1}`` off, so to first order the loss changes by
``-sum_{i=r}^{a-1} dL/dm_i``; growing it to ``r > a`` switches ``m_a .. m_{r-1}`` on, a
change of ``+sum_{i=a}^{r-1} dL/dm_i`` (the gradient of an inactive slice, taken at
``m_i = 0``, is its first-order gain). At ``m = 1``, ``dL/dm_i = <dL/dA[i], A[i]>``. One
backward pass per batch with a float mask as the only tensor that needs a gradient gives
``dL/dm`` of every adapter at once, hence the estimate of every group at every rank.

The estimate of a configuration is the anchor's loss plus the sum of its groups' changes
(additive across groups): docs/search.md says when that misleads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from shears.adapters import (
    ElasticIndex,
    elastic_index,
    maximal_config,
    minimal_config,
    validate_config,
)
from shears.adapters.layer import ElasticLoRALinear
from shears.atomic import read_json, write_json

from .chunked import Loss, token_loss
from .result import Config

METHODS = ("tangent", "path")


@dataclass
class RankSensitivity:
    """The estimated loss change of every group at every rank, against an anchor.

    Attributes:
        anchor: the configuration the changes are measured from.
        deltas: group -> {rank: estimated loss change}; the anchor's own rank has 0.0.
        base_loss: the anchor's measured loss (token mean) on the batches.
        tokens: label tokens the loss counted (their summed ``weights`` when the batches
            carry them, see :func:`~shears.search.chunked.stratified_batches`).
        method: ``"tangent"`` (the gradient at the anchor) or ``"path"`` (trapezoid rule of
            the gradients along the segment from the maximal to the minimal sub-adapter).
        points: masks the gradient was taken at (1 for a tangent).
        path_losses: measured loss at each of those masks (the first is ``base_loss``).
    """

    anchor: Config
    deltas: dict[str, dict[int, float]]
    base_loss: float
    tokens: float
    method: str = "tangent"
    points: int = 1
    path_losses: list[float] = field(default_factory=list)

    def estimate(self, config: Mapping[str, int]) -> float:
        """``base_loss`` plus the change of each group of ``config`` (missing groups: the
        anchor's rank, no change)."""
        valid = validate_config({g: list(d) for g, d in self.deltas.items()}, config)
        return self.base_loss + sum(self.deltas[g][r] for g, r in valid.items())

    def to_dict(self) -> dict[str, Any]:
        return {"anchor": dict(self.anchor), "base_loss": self.base_loss, "tokens": self.tokens,
                "method": self.method, "points": self.points,
                "path_losses": list(self.path_losses),
                "deltas": {g: {str(r): v for r, v in d.items()} for g, d in self.deltas.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankSensitivity:
        deltas = {g: {int(r): float(v) for r, v in d.items()} for g, d in data["deltas"].items()}
        return cls(anchor={g: int(r) for g, r in data["anchor"].items()}, deltas=deltas,
                   base_loss=float(data["base_loss"]), tokens=float(data["tokens"]),
                   method=data.get("method", "tangent"), points=int(data.get("points", 1)),
                   path_losses=[float(x) for x in data.get("path_losses", [])])

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> RankSensitivity:
        return cls.from_dict(read_json(path, "rank sensitivity"))


def rank_sensitivity(model: nn.Module, batches: Iterable[Any], config: Mapping[str, int] | None
                     = None, *, method: str = "path", points: int = 3, loss: Loss | None = None,
                     progress: bool = True) -> RankSensitivity:
    """Estimate how the loss changes when each group moves to each of its ranks.

    Args:
        model: a causal LM carrying elastic adapters (any ``rank_mode``).
        batches: held-out batches: dicts of (b, t) tensors ``input_ids``, ``labels`` (-100
            where not scored: the loss counts response tokens only, as ``evaluate_loss``)
            and ``attention_mask``; or anything ``loss`` accepts. Iterated once.
        config: the anchor (``"tangent"`` only); the maximal sub-adapter by default.
        method: ``"path"`` (the default): the mean gradient along the straight segment of
            masks from the maximal to the minimal sub-adapter (trapezoid rule on ``points``
            evenly spaced masks, both ends included; ``points`` passes per batch), anchored
            at the maximal sub-adapter; an integrated gradient, exact for a loss quadratic
            along the segment. ``"tangent"``: the gradient of the rank masks at the anchor,
            one forward and backward pass per batch; cheaper, but on a trained
            super-adapter the loss is far from linear in the masks: on SmolLM2 its rank
            correlation with measured losses was -0.005 at the maximal anchor, 0.73 at the
            heuristic, against 0.95 for the 3-point path (docs/search.md).
        points: masks on the segment (``"path"`` only), at least 2.
        loss: ``loss(model, batch) -> (sum, count)``, 0-d tensors; default the summed
            next-token cross-entropy over label tokens (:func:`token_loss`).
        progress: show a tqdm bar over the batches.

    The model is left as it was: configuration, ``rank_mode``, train/eval mode, every
    ``requires_grad`` and every ``.grad`` (no parameter takes a gradient; only the
    temporary masks do). Losses and gradients stay on the device until the end (one
    transfer), so the pass adds no host synchronisation per batch.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    index = elastic_index(model)
    space = {g: list(r) for g, r in index.space.items()}
    if method == "path":
        if config is not None:
            raise ValueError('method="path" runs from the maximal to the minimal sub-adapter; '
                             'it takes no anchor config (pass method="tangent" to anchor the '
                             "estimate at config)")
        if points < 2:
            raise ValueError(f'method="path" needs at least 2 points, got {points}')
    n_points = points if method == "path" else 1
    anchor = maximal_config(space) if config is None else validate_config(space, config)
    missing = [g for g in space if g not in anchor]
    if missing:
        raise KeyError(f"config misses groups {missing[:5]}: pass a complete configuration")
    masks = _masks_along(space, anchor, method, n_points)  # per point: group -> (r_max,)
    weights = _trapezoid(n_points)
    loss = loss or token_loss
    with _mask_probe(model, index) as probes:
        first = next(iter(probes.values()))[0]
        grads = {g: torch.zeros(space[g][0], dtype=_acc_dtype(leaves[0]),
                                device=leaves[0].device) for g, leaves in probes.items()}
        totals = torch.zeros(n_points, dtype=_acc_dtype(first), device=first.device)
        count = torch.zeros((), dtype=_acc_dtype(first), device=first.device)
        for batch in tqdm(batches, desc="rank sensitivity", disable=not progress):
            for k in range(n_points):
                _write_masks(probes, masks[k])
                total, n = loss(model, batch)
                total.backward()
                totals[k] += total.detach().to(totals)
                for g, leaves in probes.items():
                    for leaf in leaves:  # the group's adapters share its rank
                        grads[g] += weights[k] * leaf.grad.to(grads[g])
                        leaf.grad = None
                if k == 0:
                    count += n.to(count)
        # One transfer for everything, after the last batch: count, losses, gradients.
        flat = torch.cat([count.double().reshape(1).cpu(), totals.double().cpu(),
                          *(grads[g].double().cpu() for g in space)]).tolist()
    tokens, losses = flat[0], flat[1: 1 + n_points]
    flat = flat[1 + n_points:]
    if tokens == 0:
        raise ValueError("the batches hold no label tokens (all -100)")
    losses = [x / tokens for x in losses]
    deltas, at = {}, 0
    for g, ranks in space.items():
        mean = [x / tokens for x in flat[at: at + ranks[0]]]  # dL/dm_i of the token mean
        at += ranks[0]
        cumulative = [0.0]
        for x in mean:
            cumulative.append(cumulative[-1] + x)
        # cutting a -> r: -(sum over r..a-1); growing a -> r: +(sum over a..r-1)
        deltas[g] = {r: cumulative[r] - cumulative[anchor[g]] for r in ranks}
        deltas[g][anchor[g]] = 0.0
    return RankSensitivity(anchor=dict(anchor), deltas=deltas, base_loss=losses[0],
                           tokens=tokens, method=method, points=n_points, path_losses=losses
                           if method == "path" else [])


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in fp64 (fp32 on devices without it), whatever the adapters' dtype."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _trapezoid(n: int) -> list[float]:
    """Trapezoid-rule weights of ``n`` evenly spaced points on [0, 1] (one point: 1)."""
    if n == 1:
        return [1.0]
    w = [1.0 / (n - 1)] * n
    w[0] = w[-1] = 0.5 / (n - 1)
    return w


def _masks_along(space: dict[str, list[int]], anchor: Config, method: str,
                 n: int) -> list[dict[str, list[float]]]:
    """The rank masks (group -> r_max values) at each point: the anchor's 0/1 prefix for a
    tangent; on the path, 1 below r_min and ``1 - t`` above it, t = 0 .. 1."""
    if method == "tangent":
        return [{g: [1.0] * anchor[g] + [0.0] * (r[0] - anchor[g]) for g, r in space.items()}]
    low = minimal_config(space)
    return [{g: [1.0] * low[g] + [1.0 - k / (n - 1)] * (r[0] - low[g]) for g, r in space.items()}
            for k in range(n)]


def _write_masks(probes: dict[str, list[torch.Tensor]], masks: dict[str, list[float]]) -> None:
    with torch.no_grad():
        for g, leaves in probes.items():
            values = torch.tensor(masks[g], dtype=leaves[0].dtype)
            for leaf in leaves:
                leaf.copy_(values)  # host -> device copy, no read back


@contextmanager
def _mask_probe(model: nn.Module, index: ElasticIndex):
    """Every adapter in ``rank_mode="mask"`` with a float (r_max,) leaf as its rank mask,
    the only tensor that takes a gradient; everything is put back afterwards.

    ``ElasticLoRALinear.forward`` multiplies ``A`` by ``rank_mask[:, None]`` in mask mode,
    so a float mask that requires a gradient makes ``dL/dm`` come out of ``backward`` at no
    cost beyond the activations' gradients (no parameter gradient is computed)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modules: list[ElasticLoRALinear] = [m for ms in index.groups.values() for m in ms]
    modes = [(m, m.rank_mode) for m in modules]
    was_training = model.training
    probes: dict[str, list[torch.Tensor]] = {}
    bool_masks: dict[ElasticLoRALinear, torch.Tensor] = {}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()  # no dropout: the loss of the sub-adapter as a judge sees it
        for g, ms in index.groups.items():
            probes[g] = []
            for m in ms:
                m.rank_mode = "mask"
                bool_masks[m] = m._buffers["rank_mask"]
                leaf = torch.zeros(m.r_max, dtype=m.lora_A.dtype, device=m.lora_A.device,
                                   requires_grad=True)
                m._buffers["rank_mask"] = leaf  # the bool buffer comes back in finally
                probes[g].append(leaf)
        with torch.enable_grad():
            yield probes
    finally:
        for m, mode in modes:
            if m in bool_masks:  # the same tensor object: a compiled graph keeps its guard
                m._buffers["rank_mask"] = bool_masks[m]
            m.rank_mode = mode  # "slice" drops the mask, "mask" rewrites it from the rank
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
