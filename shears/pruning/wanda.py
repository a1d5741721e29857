"""Wanda (Sun et al., 2023): prune by |W| * ||X||, one shot, no weight update."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import torch
from torch import nn
from tqdm.auto import tqdm

from shears.pruning.calibration import as_calibration, check_token_ids
from shears.pruning.capture import capture_block_inputs, run_pass
from shears.pruning.layers import find_decoder_blocks, prunable_modules, weight_matrix
from shears.pruning.masks import (
    magnitude_scores,
    nm_mask,
    parse_pattern,
    unstructured_mask,
    wanda_scores,
    zero_masked_,
)
from shears.pruning.owl import (
    block_allocation,
    check_owl_settings,
    outlier_ratios,
    owl_allocation,
    per_map_sparsity,
)
from shears.pruning.statistics import InputStatistics

from .report import SparsityReport, sparsity_report


def _resolve_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, Real)):
        raise TypeError(f"sparsity must be a number in [0, 1) such as 0.5 (or None), got "
                        f"{type(sparsity).__name__} {sparsity!r}")
    if nm is not None:
        if sparsity is not None and abs(sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(f"sparsity={sparsity} contradicts the {nm[0]}:{nm[1]} pattern "
                             f"({nm[0] / nm[1]}); leave sparsity unset for N:M")
        return nm[0] / nm[1]
    sparsity = 0.5 if sparsity is None else sparsity
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return sparsity


def _prune(module: nn.Module, scores: torch.Tensor, sparsity: float, nm) -> None:
    mask = unstructured_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)
    zero_masked_(weight_matrix(module), mask.to(module.weight.device))


def _device_of(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


def _check_finite(values, where: str) -> None:
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise RuntimeError(f"non-finite activations in {where}; check the model's dtype "
                           "(fp16 overflow?) and the calibration data")


@torch.no_grad()
def _wanda_block(block, modules, inputs, calib, batch_size, device, sparsity, nm,
                 sequential: bool, propagate: bool, name: str) -> None:
    # Sequential: statistics from this block's own (dense) forward, then the pruned block
    # produces the next block's inputs. Otherwise one dense pass does both.
    stats = InputStatistics(modules, device, stop_early=sequential or not propagate)
    try:
        run_pass(block, inputs, calib, batch_size, device, stats,
                  write=propagate and not sequential)
    finally:
        stats.remove()
    means = stats.means(len(calib))
    _check_finite(means.values(), f"decoder block {name}")
    for qualified, module in modules.items():
        _prune(module, wanda_scores(weight_matrix(module), means[qualified]),
               sparsity[qualified], nm)
    if propagate and sequential:
        run_pass(block, inputs, calib, batch_size, device, None, write=True)
    if propagate:
        _check_finite([inputs.hidden], f"the outputs of decoder block {name}")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model has parameters on the meta device; load real weights "
                         "first (e.g. without device_map='meta' / init_empty_weights)")


def _check_weights(per_block) -> None:
    """Refuse NaN/inf in any map to be pruned, before the first block is touched: its scores
    would be NaN and its mask arbitrary, and in the last block no activation would show it.
    ``aminmax`` propagates NaN and shows an inf as the min or max: one reduction per weight,
    no weight-sized temporary (``isfinite(w).all()`` took 54x the time of ``w.sum()`` on a
    (11008, 4096) fp32 CPU weight, aminmax 1.2x). The count is taken only on failure."""
    for _, modules in per_block:
        for name, module in modules.items():
            w = module.weight
            if not all(bool(torch.isfinite(v)) for v in torch.aminmax(w)):
                bad = int((~torch.isfinite(w)).sum())
                raise ValueError(f"{name}.weight holds {bad} NaN/inf of {w.numel()} entries; "
                                 "Wanda cannot rank them. Reload or repair the weights, or "
                                 "leave this map out with exclude=")


def _vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the input embedding, or None when the model does not expose one."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embedding, "num_embeddings", None)


def wanda_prune(
    model: nn.Module,
    calibration=None,
    sparsity: float | Mapping[str | int, float] | None = None,
    *,
    pattern: str = "unstructured",
    method: str = "wanda",
    allocation: str = "uniform",
    owl_threshold: float = 5.0,
    owl_lambda: float = 0.08,
    owl_rows: int | str | None = "auto",
    sequential: bool = True,
    batch_size: int = 1,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    offload_device: str | torch.device | None = None,
    progress: bool = True,
) -> SparsityReport:
    """Prune the linear maps of a causal LM's decoder blocks in place, in one shot.

    Args:
        model: a decoder-only Hugging Face model (``nn.Linear`` and ``Conv1D`` maps).
        calibration: LongTensor (n, seqlen) of token ids (see :func:`calibration_data`), a
            list of dicts with ``input_ids`` (and optional ``attention_mask``), or a
            DataLoader yielding such dicts. Unused by ``method="magnitude"``.
        sparsity: fraction zeroed in each output row, in [0, 1). Default 0.5, or N/M. Or a
            mapping (unstructured only) from decoder-block index (``int``, or a string of
            digits) or qualified module name to that block's / map's sparsity, covering every
            selected map once; ``SparsityReport.allocation`` is such a mapping.
        pattern: ``"unstructured"`` or ``"N:M"`` (the N lowest of each M consecutive inputs).
        method: ``"wanda"`` (|W| * sqrt(mean over sequences of sum_tokens x^2)) or
            ``"magnitude"`` (|W|, the baseline).
        allocation: ``"uniform"`` (every map gets ``sparsity``) or ``"owl"`` (OWL, Yin et al.
            2024: a sparsity per decoder block from its share of outlier scores, measured on
            the dense model in one extra pass; the mean over prunable parameters is exactly
            ``sparsity``, each block within ``sparsity`` +- ``owl_lambda``; see
            :func:`shears.pruning.owl.owl_allocation`). Unstructured and a float only.
        owl_threshold: M, a score is an outlier above M times its block's mean score.
        owl_lambda: the allocation's half-range around ``sparsity``.
        owl_rows: calibration rows (the first ones) OWL's dense pass uses: ``"auto"`` (the
            default) takes an eighth of them (at least one), which keeps OWL within 1.1x of
            uniform Wanda's time (SmolLM2: D_l from 4 of 32 rows moved no block's sparsity
            by more than 0.0073, docs/pruning.md); ``None`` takes all, as luuyin/OWL.
        sequential: prune block after block, each block's pruned outputs feeding the next
            (the reference behaviour); False takes every statistic from the dense model.
        batch_size: calibration rows per block call. The default 1 reproduces the reference
            implementation's masks bit for bit and needs the least memory; larger batches are
            a little faster but fp32 GEMMs of another shape round differently, and the
            differences compound block after block (SmolLM2-135M, 30 blocks: batch 8 keeps
            99.8% of the reference mask, see docs/benchmarks.md).
        targets, exclude: regexes over qualified module names (``re.search``).
        offload_device: keep the model where it is (e.g. CPU) and move one decoder block at
            a time to this device; calibration activations stay on the model's device.
        progress: show a progress bar per decoder block.

    Returns:
        The :class:`SparsityReport` of the pruned maps: each map's target and measured
        sparsity, ``allocation`` ({block index: sparsity} when the maps of each block share
        one) and, for OWL, ``outlier_ratios`` ({block index: D_l}).
    """
    nm = parse_pattern(pattern)
    mapping = isinstance(sparsity, Mapping)
    if mapping and nm is not None:
        raise ValueError(f"a sparsity per block or map is for unstructured pruning; the "
                         f"{pattern} pattern fixes every map's sparsity at {nm[0]}/{nm[1]}")
    if not mapping:
        sparsity = _resolve_sparsity(sparsity, nm)
    if method not in ("wanda", "magnitude"):
        raise ValueError(f"method must be 'wanda' or 'magnitude', got {method!r}")
    _check_allocation(allocation, nm, mapping, sparsity, owl_threshold, owl_lambda, owl_rows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_model(model)
    per_block = prunable_modules(model, targets, exclude)
    per_map = per_map_sparsity(per_block, sparsity)
    _check_weights(per_block)
    pruned = [name for _, modules in per_block for name in modules]
    offload = torch.device(offload_device) if offload_device else None
    ratios = None
    if method == "magnitude":
        if allocation == "owl":
            ratios, per_map = _owl(model, per_block, None, sparsity, owl_threshold,
                                   owl_lambda, owl_rows, batch_size, offload, progress)
        with torch.no_grad():
            for _, modules in per_block:
                for name, module in modules.items():
                    _prune(module, magnitude_scores(weight_matrix(module)), per_map[name], nm)
        return _report(model, pruned, per_map, per_block, ratios)
    calib = as_calibration(calibration)  # validated before any weight is touched
    vocab_size = _vocabulary_size(model)
    if vocab_size is not None:
        check_token_ids(calib, vocab_size)
    was_training = model.training
    model.eval()
    try:
        if allocation == "owl":
            ratios, per_map = _owl(model, per_block, calib, sparsity, owl_threshold,
                                   owl_lambda, owl_rows, batch_size, offload, progress)
        _prune_blocks(model, per_block, calib, per_map, nm, sequential, batch_size,
                      offload, progress)
    finally:
        model.train(was_training)
    return _report(model, pruned, per_map, per_block, ratios)


def _check_allocation(allocation, nm, mapping, sparsity, threshold, lam, rows) -> None:
    if allocation not in ("uniform", "owl"):
        raise ValueError(f"allocation must be 'uniform' or 'owl', got {allocation!r}")
    if allocation == "uniform":
        return
    if nm is not None:
        raise ValueError(f"allocation='owl' sets a sparsity per block, which an N:M pattern "
                         f"cannot take (every block of {nm[1]} keeps {nm[1] - nm[0]}); use "
                         "pattern='unstructured', or allocation='uniform' for N:M")
    if mapping:
        raise ValueError("allocation='owl' computes the sparsity per block itself; give it "
                         "the overall target as a float (or pass your mapping with "
                         "allocation='uniform')")
    check_owl_settings(threshold, lam)
    if rows is not None and rows != "auto" and (
            isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"owl_rows must be a positive int, 'auto' (an eighth of the rows) or "
                         f"None (all rows), got {rows!r}")
    owl_allocation({0: 0.0}, {0: 1}, sparsity, lam)  # S + lambda < 1, before any pass


def _owl(model, per_block, calib, sparsity, threshold, lam, rows, batch_size, offload,
         progress):
    """OWL's outlier ratios (dense model) and the per-map sparsity of its allocation."""
    _, blocks = find_decoder_blocks(model)
    if rows == "auto" and calib is not None:  # magnitude OWL needs no calibration
        rows = -(-len(calib) // 8)  # an eighth: the dense pass costs ~1/16 of Wanda's two
    elif rows == "auto":
        rows = None
    ratios = outlier_ratios(model, blocks, per_block, calib, threshold, rows=rows,
                            batch_size=batch_size, offload_device=offload, progress=progress)
    parameters = {i: sum(weight_matrix(m).numel() for m in modules.values())
                  for i, (_, modules) in enumerate(per_block) if modules}
    blocks_sparsity = owl_allocation(ratios, parameters, sparsity, lam)
    return ratios, per_map_sparsity(per_block, blocks_sparsity)


def _report(model, pruned, per_map, per_block, ratios) -> SparsityReport:
    report = sparsity_report(model, pruned)
    for row in report.modules:
        row.target = per_map[row.name]
    report.allocation = block_allocation(per_block, per_map)
    report.outlier_ratios = ratios
    return report


def _prune_blocks(model, per_block, calib, sparsity, nm, sequential, batch_size,
                  offload_device, progress) -> None:
    # sparsity: qualified map name -> its sparsity
    prefix, blocks = find_decoder_blocks(model)
    last = max(i for i, (_, modules) in enumerate(per_block) if modules)
    store = _device_of(model) if offload_device is None else torch.device("cpu")
    inputs = capture_block_inputs(model, blocks[0], calib, batch_size, store)
    bar = tqdm(per_block[: last + 1], desc="wanda", unit="block", disable=not progress)
    for i, (block, modules) in enumerate(bar):
        home = _device_of(block)
        device = offload_device or home
        block.to(device)
        name = f"{prefix}.{i}"
        if modules:
            _wanda_block(block, modules, inputs, calib, batch_size, device, sparsity, nm,
                         sequential, propagate=i < last, name=name)
        else:
            run_pass(block, inputs, calib, batch_size, device, None, write=True)
        block.to(home if offload_device is None else store)
