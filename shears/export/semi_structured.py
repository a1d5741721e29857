"""2:4 sparsity into speed: the weights of 2:4-sparse maps as CUDA semi-structured tensors.

``torch.sparse.to_sparse_semi_structured`` (torch 2.13, ``torch/sparse/semi_structured.py``)
compresses an (out, in) weight with at most 2 non-zeros in every group of 4 consecutive
inputs, and ``F.linear`` then runs on the sparse tensor cores (compute capability >= 8.0).
It checks device, dtype and shape itself, but one map at a time and only while converting,
and neither backend checks the 2:4 pattern (the CUTLASS conversion,
``_semi_structured_conversions.py``, documents that it silently drops the excess
non-zeros); so everything is checked here first, for every map, on any device
(:func:`check_semi_structured`, :func:`semi_structured_problems`), and nothing is converted
unless all maps pass.

Kernel constraints, from ``_DTYPE_SHAPE_CONSTRAINTS`` (``sparse_min_rows``,
``sparse_min_cols``): the weight's rows (out) and columns (in) must each be at least, and a
multiple of:

| backend | float16 / bfloat16 | (float32, int8, fp8: not used here) |
| --- | --- | --- |
| cuSPARSELt (default when available) | (16, 16) | int8 / fp8 (32, 32) |
| CUTLASS (fallback) | (32, 64) | fp32 (32, 32), int8 (16, 128) |

The activations need no alignment: torch pads the dense operand to the kernel's
``dense_min_rows/cols`` itself. A bias must have the weight's dtype (cuSPARSELt).

Decisions:
- GPT-2's ``Conv1D`` stores (in, out) and multiplies ``x @ W``: the 2:4 groups Wanda made run
  along ``in`` (down the columns of the stored tensor), which is not the layout the kernel
  compresses. Such a map is replaced by an equivalent ``nn.Linear`` holding ``W.T`` first.
- A map carrying an elastic adapter: its ``base_layer`` is converted and the adapter stays
  unmerged (Shears' deployment: sparse base, dense low-rank update on the side). A
  ``sparse_adapter=True`` adapter is refused: its forward masks the update with the base
  weight's non-zeros, which a compressed tensor cannot give; merge it first
  (``merge_adapters`` keeps 2:4 exactly).
- The result is for inference: semi-structured weights have no state dict that
  ``save_pretrained`` can write, so save (or merge) before converting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from shears.adapters import ElasticLoRALinear
from shears.pruning.layers import find_decoder_blocks, is_linear, linear_modules, weight_matrix
from shears.quantization.bnb import is_bnb_4bit

# (min rows = out_features, min cols = in_features); both must also be multiples of these.
KERNEL_MIN_SHAPE: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
}


def semi_structured_backend() -> str:
    """``"cusparselt"`` when torch was built with it (the default backend), else
    ``"cutlass"`` (what ``to_sparse_semi_structured`` uses with ``_FORCE_CUTLASS``)."""
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


def two_four_violations(weight: torch.Tensor) -> int:
    """Groups of 4 consecutive inputs holding more than 2 non-zeros, in an (out, in) weight
    whose ``in`` is a multiple of 4."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise ValueError(f"in_features={in_f} is not a multiple of 4")
    nonzero = (weight != 0).reshape(out_f, in_f // 4, 4).sum(-1)
    return int((nonzero > 2).sum())


def semi_structured_problems(weights: Mapping[str, torch.Tensor],
                             backend: str = "cusparselt") -> list[str]:
    """Why each (out, in) weight cannot become a semi-structured tensor; empty if all can.

    Pure (no CUDA needed): checks the dtype, the kernel's shape constraints of ``backend``
    (``KERNEL_MIN_SHAPE``) and the 2:4 pattern, and reports every problem of every map.
    """
    if backend not in KERNEL_MIN_SHAPE:
        raise ValueError(f"backend must be one of {list(KERNEL_MIN_SHAPE)}, got {backend!r}")
    table = KERNEL_MIN_SHAPE[backend]
    problems = []
    for name, w in weights.items():
        if w.dim() != 2:
            problems.append(f"{name}: a {w.dim()}-d weight; the kernel takes (out, in)")
            continue
        rows, cols = w.shape
        if w.dtype not in table:
            problems.append(f"{name}: dtype {w.dtype}; the 2:4 kernels take float16 or "
                            "bfloat16 (model.to(torch.bfloat16) first)")
        min_rows, min_cols = table.get(w.dtype, table[torch.float16])
        if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
            problems.append(f"{name}: shape (out={rows}, in={cols}); {backend} needs both "
                            f"at least and a multiple of ({min_rows}, {min_cols})")
        if cols % 4 == 0:  # otherwise the shape is refused already (every min_cols is 4k)
            bad = two_four_violations(w)
            if bad:
                problems.append(f"{name}: not 2:4, {bad} of {rows * cols // 4} groups of 4 "
                                "consecutive inputs hold more than 2 non-zeros (prune with "
                                "wanda_prune(..., pattern='2:4'))")
    return problems


def _candidate_maps(model: nn.Module, modules: Sequence[str] | None) -> dict[str, nn.Module]:
    """The linear maps to convert: those of the decoder blocks (what Wanda prunes), or the
    named ones."""
    if modules is not None:
        named = dict(model.named_modules())
        missing = [n for n in modules if n not in named or not is_linear(named[n])]
        if missing:
            raise KeyError(f"no Linear/Conv1D module named {missing}")
        return {n: named[n] for n in modules}
    prefix, blocks = find_decoder_blocks(model)
    found: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        found.update(linear_modules(block, f"{prefix}.{i}"))
    return found


def _adapter_problems(model: nn.Module, names: Sequence[str]) -> list[str]:
    problems = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else None
        if isinstance(parent, ElasticLoRALinear) and child == "base_layer" \
                and parent.sparse_adapter:
            problems.append(f"{parent_name}: carries a sparse_adapter=True adapter, whose "
                            "forward masks the update with the base weight; merge it first "
                            "(shears.merge_adapters keeps 2:4 exactly)")
    return problems


def _bias_problems(maps: Mapping[str, nn.Module]) -> list[str]:
    return [f"{n}: bias dtype {m.bias.dtype} differs from the weight's {m.weight.dtype}"
            for n, m in maps.items()
            if getattr(m, "bias", None) is not None and m.bias.dtype != m.weight.dtype]


def check_semi_structured(model: nn.Module, modules: Sequence[str] | None = None,
                          backend: str = "cusparselt") -> list[str]:
    """Every reason why ``to_semi_structured(model, modules, backend=backend)`` would refuse,
    CUDA aside; empty when it would convert. Pure: runs on CPU, changes nothing."""
    maps = _candidate_maps(model, modules)
    quantized = [f"{n}: a bitsandbytes 4-bit weight (packed NF4/FP4 codes); the 2:4 kernels "
                 "take float16/bfloat16 weights" for n, m in maps.items() if is_bnb_4bit(m)]
    if quantized:  # its packed (n, 1) uint8 weight is no (out, in) matrix to check
        return quantized + _adapter_problems(model, list(maps))
    problems = semi_structured_problems({n: weight_matrix(m) for n, m in maps.items()}, backend)
    return problems + _adapter_problems(model, list(maps)) + _bias_problems(maps)


def _check_cuda(maps: Mapping[str, nn.Module]) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs CUDA: the 2:4 kernels (cuSPARSELt / CUTLASS) run only "
            "on NVIDIA GPUs of compute capability >= 8.0, and this machine has no CUDA device. "
            "On CPU keep the sparse weights dense (or export them with save_pretrained).")
    off = [n for n, m in maps.items() if m.weight.device.type != "cuda"]
    if off:
        raise RuntimeError(f"{len(off)} maps are not on a CUDA device (e.g. {off[0]}); "
                           "call model.cuda() first")
    for device in {m.weight.device for m in maps.values()}:
        if torch.cuda.get_device_capability(device) < (8, 0):
            raise RuntimeError(f"{device} has compute capability "
                               f"{torch.cuda.get_device_capability(device)}; 2:4 sparse "
                               "tensor cores need >= 8.0 (Ampere or later)")


def _as_linear(conv: Conv1D) -> nn.Linear:
    """An ``nn.Linear`` computing what ``conv`` computes, weight stored (out, in)."""
    w = conv.weight
    linear = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None,
                       device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _compress(weight: torch.Tensor, backend: str) -> torch.Tensor:
    from torch.sparse import (
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" \
        else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(weight.detach().contiguous())


def to_semi_structured(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    *,
    backend: str | None = None,
    progress: bool = True,
) -> nn.Module:
    """Convert the weights of 2:4-sparse linear maps to semi-structured tensors, in place.

    For inference on CUDA in float16 / bfloat16 (see the module docstring for the kernel
    constraints, GPT-2's ``Conv1D`` and elastic adapters). Everything is checked before
    anything is converted: ``RuntimeError`` without CUDA (or for maps off the GPU),
    ``ValueError`` listing every map that is not 2:4, has a shape or dtype the kernel
    refuses, or carries a ``sparse_adapter=True`` adapter.

    Args:
        model: a 2:4-pruned model on a CUDA device (``wanda_prune(model, calib,
            pattern="2:4")``), cast to float16 or bfloat16.
        modules: qualified names of the maps to convert; default every linear map inside
            the decoder blocks (the maps Wanda prunes; embeddings and ``lm_head`` stay
            dense).
        backend: ``"cusparselt"`` or ``"cutlass"``; default :func:`semi_structured_backend`.
        progress: a progress bar over the maps.

    Returns:
        ``model``; its converted weights are ``SparseSemiStructuredTensor`` parameters
        (``requires_grad=False``).
    """
    maps = _candidate_maps(model, modules)
    _check_cuda(maps)
    backend = backend or semi_structured_backend()
    problems = check_semi_structured(model, list(maps), backend)
    if problems:
        shown = "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else "")
        raise ValueError(f"{len(problems)} problems, nothing converted:\n  {shown}")
    for name, module in tqdm(maps.items(), desc="2:4", unit="map", disable=not progress):
        if isinstance(module, Conv1D):
            parent_name, _, child = name.rpartition(".")
            module = _as_linear(module)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
        module.weight = nn.Parameter(_compress(module.weight, backend), requires_grad=False)
        module.register_forward_pre_hook(_contiguous_input)
    return model


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """torch's semi-structured linear flattens its input with ``view``, which a
    non-contiguous activation would refuse; ``contiguous()`` is free when it already is."""
    return (args[0].contiguous(), *args[1:])
