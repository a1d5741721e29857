"""Layer-wise sparsity: a sparsity per map or per block, and OWL's allocation.

OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", ICML 2024; code: luuyin/OWL,
``lib/prune_all.py``, ``prune_wanda_outlier``) gives a decoder block with many outlier
Wanda scores a lower sparsity. For block l,

    D_l = share of the scores |W_ij| * ||X_j|| of the block's maps (all of them together)
          above M times their mean                                     (M = owl_threshold)

and the allocation normalises D to [0, 2 lambda] and subtracts it, so the block with the most
outliers is the least pruned. The scores come from the statistics of the *dense* model (the
reference computes every D_l before pruning anything; an allocation must be known before
block 0 is pruned), in one extra pass over the blocks (:func:`outlier_ratios`).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import torch
from torch import nn
from tqdm.auto import tqdm

from shears.pruning.calibration import Calibration
from shears.pruning.capture import capture_block_inputs, run_pass
from shears.pruning.layers import weight_matrix
from shears.pruning.masks import magnitude_scores, wanda_scores
from shears.pruning.statistics import InputStatistics

PerBlock = list[tuple[nn.Module, dict[str, nn.Module]]]


# ---- a sparsity per map: from a float, a mapping, or an allocation ----
def _check_value(key, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"sparsity[{key!r}] must be a number in [0, 1), got "
                        f"{type(value).__name__} {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"sparsity[{key!r}] must be in [0, 1), got {value}")
    return float(value)


def _block_index(key, n_blocks: int) -> int | None:
    """``key`` as a block index (an int, or a string of digits as JSON writes int keys), or
    None when it is not one."""
    if isinstance(key, bool):
        raise TypeError(f"sparsity mapping key {key!r}: use a block index or a module name")
    if isinstance(key, int):
        index = key
    elif isinstance(key, str) and key.isdigit():
        index = int(key)
    else:
        return None
    if not 0 <= index < n_blocks:
        raise ValueError(f"sparsity mapping: no decoder block {key!r} (the model has "
                         f"{n_blocks}, indices 0-{n_blocks - 1})")
    return index


def per_map_sparsity(per_block: PerBlock, sparsity: float | Mapping) -> dict[str, float]:
    """Qualified map name -> its sparsity, for every selected map of ``per_block``.

    ``sparsity`` is a float (every map), or a mapping whose keys are block indices (every
    selected map of the block; ``int`` or a string of digits, as the keys of
    ``SparsityReport.allocation`` come back from JSON) or qualified module names (that map).
    Every selected map must get exactly one value.

    Raises:
        TypeError: a key that is neither, or a value that is not a number.
        ValueError: an unknown name or index, a block without selected maps, a map given
            twice (by its name and its block), a selected map left without a value, or a
            value outside [0, 1).
    """
    if not isinstance(sparsity, Mapping):
        return {name: sparsity for _, modules in per_block for name in modules}
    selected = {name: i for i, (_, modules) in enumerate(per_block) for name in modules}
    out: dict[str, float] = {}
    by_block: dict[str, int] = {}
    for key, value in sparsity.items():
        value = _check_value(key, value)
        index = _block_index(key, len(per_block))
        if index is None:
            if not isinstance(key, str):
                raise TypeError(f"sparsity mapping key {key!r}: use a block index (int) or a "
                                "qualified module name (str)")
            if key not in selected:
                shown = ", ".join(list(selected)[:8]) + (" ..." if len(selected) > 8 else "")
                raise ValueError(f"sparsity mapping: {key!r} is not a map to be pruned (check "
                                 f"targets/exclude); the maps are named like {shown}")
            names = [key]
        else:
            names = list(per_block[index][1])
            if not names:
                raise ValueError(f"sparsity mapping: decoder block {index} has no map to "
                                 "prune (targets/exclude leave none)")
        for name in names:
            if name in out:
                raise ValueError(f"sparsity mapping gives {name!r} twice (by its name and "
                                 f"by block {selected[name]}, or by two keys)")
            out[name] = value
            if index is not None:
                by_block[name] = index
    missing = [name for name in selected if name not in out]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"sparsity mapping leaves {len(missing)} selected maps without a "
                         f"sparsity ({shown}); give every block or map a value, or narrow "
                         "targets/exclude")
    return out


def block_allocation(per_block: PerBlock, per_map: Mapping[str, float]) -> dict[int, float] | None:
    """{block index: sparsity} when every selected map of a block has the same sparsity (a
    mapping reusable as ``sparsity=``), else None."""
    allocation = {}
    for i, (_, modules) in enumerate(per_block):
        values = {per_map[name] for name in modules}
        if len(values) > 1:
            return None
        if values:
            allocation[i] = values.pop()
    return allocation


# ---- OWL ----
def _block_ratio(modules: dict[str, nn.Module], means: dict[str, torch.Tensor] | None,
                 threshold: float) -> float:
    """D of one block, scores computed map by map twice (the mean, then the count) rather
    than all kept at once."""
    def scores():
        for name, m in modules.items():
            w = weight_matrix(m)
            yield magnitude_scores(w) if means is None else wanda_scores(w, means[name])

    total = sum(weight_matrix(m).numel() for m in modules.values())
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores()) / total
    count = sum(int((s > threshold * mean).sum()) for s in scores())
    return count / total


def _device_of(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


@torch.no_grad()
def outlier_ratios(
    model: nn.Module,
    blocks: nn.ModuleList,
    per_block: PerBlock,
    calibration: Calibration | None,
    threshold: float,
    *,
    rows: int | None = None,
    batch_size: int = 1,
    offload_device: torch.device | None = None,
    progress: bool = False,
) -> dict[int, float]:
    """{block index: D_l} for every block with selected maps, from the dense model.

    With ``calibration`` None the scores are magnitudes (OWL's ``prune_mag_outlier``). With
    calibration, one dense pass: the first ``rows`` calibration rows (all by default) are run
    through the unpruned blocks, each block's outputs feeding the next, and D_l comes from
    the Wanda scores of block l's input statistics. Nothing is written to the weights.
    """
    if calibration is None:
        return {i: _block_ratio(modules, None, threshold)
                for i, (_, modules) in enumerate(per_block) if modules}
    if rows is not None:
        mask = calibration.attention_mask
        calibration = Calibration(calibration.input_ids[:rows],
                                  None if mask is None else mask[:rows])
    last = max(i for i, (_, modules) in enumerate(per_block) if modules)
    store = _device_of(model) if offload_device is None else torch.device("cpu")
    inputs = capture_block_inputs(model, blocks[0], calibration, batch_size, store)
    ratios = {}
    bar = tqdm(per_block[: last + 1], desc="owl", unit="block", disable=not progress)
    for i, (block, modules) in enumerate(bar):
        home = _device_of(block)
        device = offload_device or home
        block.to(device)
        stats = InputStatistics(modules, device, stop_early=i == last) if modules else None
        try:
            run_pass(block, inputs, calibration, batch_size, device, stats, write=True)
        finally:
            if stats is not None:
                stats.remove()
        if modules:
            means = stats.means(len(calibration))
            if not all(bool(torch.isfinite(v).all()) for v in means.values()):
                raise RuntimeError(f"non-finite activations in decoder block {i} (OWL's dense "
                                   "pass); check the model's dtype and the calibration data")
            ratios[i] = _block_ratio(modules, means, threshold)
        block.to(home if offload_device is None else store)
    return ratios


def _clip(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


def _shift(base: list[float], weights: list[int], target: float, lo: float,
           hi: float) -> float:
    """The c for which the ``weights``-weighted mean of clip(base + c, lo, hi) is
    ``target`` (lo <= target <= hi): f(c) is continuous, non-decreasing and linear between
    the breakpoints lo - b, hi - b, so c is found on the segment where f changes sign."""
    total = sum(weights)

    def f(c: float) -> float:
        return sum(w * _clip(b + c, lo, hi) for b, w in zip(base, weights, strict=True)) \
            - target * total

    points = sorted({lo - b for b in base} | {hi - b for b in base})
    for a, b in zip(points, points[1:], strict=False):
        fa, fb = f(a), f(b)
        if fa <= 0 <= fb:
            return a if fb == fa else a - fa * (b - a) / (fb - fa)
    return points[0]  # a single breakpoint: every base equal and lo == hi == target


def owl_allocation(ratios: Mapping[int, float], parameters: Mapping[int, int],
                   sparsity: float, lam: float) -> dict[int, float]:
    """{block: sparsity} from the outlier ratios D_l, OWL's rescaling.

    As luuyin/OWL: d_l = 2 lambda (D_l - min D) / (max D - min D), and sparsity_l = S - d_l
    plus a constant. OWL's constant makes the plain mean over blocks S; here it makes the
    **mean weighted by each block's prunable parameters** (``parameters[l]``, the entries of
    its selected maps) exactly S, the model's overall share of pruned weights. The result is
    clipped to [max(0, S - lambda), S + lambda] and the constant found with the clipping, so
    the weighted mean stays S. When every block is of one size and nothing needs clipping
    this is OWL's allocation. Equal ratios (or one block, or lambda 0) give S everywhere.

    Raises:
        ValueError: lambda negative, or S + lambda >= 1 (a block could not be pruned so far).
    """
    if isinstance(lam, bool) or not isinstance(lam, Real) or lam < 0:
        raise ValueError(f"owl_lambda must be a number >= 0, got {lam!r}")
    if sparsity + lam >= 1:
        raise ValueError(f"owl_lambda={lam} with sparsity={sparsity}: blocks would get up to "
                         f"{sparsity + lam:.3f} (must stay below 1); lower owl_lambda")
    blocks = sorted(ratios)
    d = [float(ratios[i]) for i in blocks]
    spread = max(d) - min(d)
    if spread == 0 or lam == 0:
        return dict.fromkeys(blocks, float(sparsity))  # exactly S, not S up to rounding
    scaled = [2 * lam * (x - min(d)) / spread for x in d]
    base = [sparsity + lam - x for x in scaled]  # in [S - lambda, S + lambda]
    lo, hi = max(0.0, sparsity - lam), sparsity + lam
    weights = [int(parameters[i]) for i in blocks]
    c = _shift(base, weights, sparsity, lo, hi)
    return {i: _clip(b + c, lo, hi) for i, b in zip(blocks, base, strict=True)}


def check_owl_settings(threshold, lam) -> None:
    for name, value in (("owl_threshold", threshold), ("owl_lambda", lam)):
        if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
