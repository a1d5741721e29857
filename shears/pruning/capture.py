"""Run a model block by block: capture what the first decoder block receives, then replay it.

The first block's inputs are caught with a forward pre-hook (positional and keyword: hidden
states, attention mask, position ids, rotary embeddings, whatever this architecture passes),
so no per-architecture code is needed. Hidden states of all calibration rows live in one
buffer that each block's outputs overwrite in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shears.pruning.calibration import Calibration
from shears.pruning.statistics import BlockDone, InputStatistics


class _Caught(Exception):
    """Raised by the pre-hook to stop the model right before the first decoder block."""


@dataclass
class BlockInputs:
    """Everything a decoder block is called with, for every calibration batch.

    Attributes:
        hidden: (n, seqlen, hidden_size) hidden states of all rows, in the model's dtype.
        calls: per batch, the remaining positional args and the keyword args of the call.
        hidden_as_kwarg: the model passes hidden states as ``hidden_states=`` rather than
            as the first positional argument.
    """

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict]]
    hidden_as_kwarg: bool


def _move(obj, device):
    """``obj`` with every tensor inside (nested tuples/lists/dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _reuse(prev, new):
    """``new``, with tensors equal to the previous batch's replaced by those (one copy of the
    rotary tables and masks instead of one per batch)."""
    if isinstance(new, torch.Tensor) and isinstance(prev, torch.Tensor):
        same = prev.shape == new.shape and prev.dtype == new.dtype and torch.equal(prev, new)
        return prev if same else new
    if isinstance(new, (tuple, list)) and isinstance(prev, type(new)) and len(prev) == len(new):
        return type(new)(_reuse(p, n) for p, n in zip(prev, new, strict=True))
    if isinstance(new, dict) and isinstance(prev, dict):
        return {k: _reuse(prev.get(k), v) for k, v in new.items()}
    return new


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    calibration: Calibration,
    batch_size: int,
    store_device: torch.device,
) -> BlockInputs:
    """Run the model on each calibration batch up to ``first_block`` and record its inputs."""

    def stop(module, args, kwargs):
        raise _Caught(args, kwargs)

    model_device = next(model.parameters()).device
    hidden, calls, as_kwarg, prev = None, [], False, None
    handle = first_block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for start, ids, mask in calibration.batches(batch_size):
            try:
                model(input_ids=ids.to(model_device), use_cache=False,
                      attention_mask=None if mask is None else mask.to(model_device))
            except _Caught as caught:
                args, kwargs = caught.args
            else:
                raise RuntimeError("the model never called its first decoder block")
            as_kwarg = not args
            x = kwargs.pop("hidden_states") if as_kwarg else args[0]
            if hidden is None:
                shape = (len(calibration), *x.shape[1:])
                hidden = torch.empty(shape, dtype=x.dtype, device=store_device)
            hidden[start : start + x.shape[0]].copy_(x)
            prev = _reuse(prev, (tuple(args[1:]), dict(kwargs)))
            calls.append(prev)
    finally:
        handle.remove()
    return BlockInputs(hidden, calls, as_kwarg)


def call_block(block: nn.Module, inputs: BlockInputs, batch: int, x: torch.Tensor,
               device: torch.device) -> torch.Tensor:
    """Call ``block`` on hidden states ``x`` (b, seqlen, hidden) of calibration batch
    ``batch`` with that batch's captured arguments; returns the output hidden states."""
    args, kwargs = _move(inputs.calls[batch], device)
    if inputs.hidden_as_kwarg:
        out = block(*args, hidden_states=x, **kwargs)
    else:
        out = block(x, *args, **kwargs)
    # transformers < 5 returns a tuple whose first element is the hidden states
    return out[0] if isinstance(out, (tuple, list)) else out


def run_pass(block, inputs: BlockInputs, calib: Calibration, batch_size: int, device,
             stats: InputStatistics | None, write: bool) -> None:
    """One pass of every calibration batch through ``block``; collect statistics if given,
    and overwrite the hidden-state buffer with the block's outputs if ``write``."""
    for b, (start, _, mask) in enumerate(calib.batches(batch_size)):
        x = inputs.hidden[start : start + batch_size].to(device, non_blocking=True)
        if stats is not None:
            stats.start_batch(None if mask is None else mask.to(device))
        try:
            out = call_block(block, inputs, b, x, device)
        except BlockDone:
            continue
        if write:
            inputs.hidden[start : start + out.shape[0]].copy_(out)
