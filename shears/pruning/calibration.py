"""Calibration data: seeded windows of tokenized text, and the accepted input forms."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


def _texts_of(texts) -> list[str]:
    """Strings from an iterable of str or a ``datasets.Dataset`` with a ``text`` column."""
    column_names = getattr(texts, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise ValueError(f"the dataset needs a 'text' column, it has {column_names}")
        texts = texts["text"]
    if isinstance(texts, str):
        texts = [texts]
    return [t for t in texts if t]


def calibration_data(
    tokenizer,
    texts: Iterable[str],
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.LongTensor:
    """Seeded random windows of ``seqlen`` tokens from the concatenated ``texts``.

    As in the Wanda/SparseGPT reference code the texts are joined ("\\n\\n") and tokenized
    once, and each window starts at a uniformly drawn offset.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: an iterable of strings, or a ``datasets.Dataset`` with a ``text`` column.
        nsamples: number of windows.
        seqlen: tokens per window.
        seed: seed of the window offsets.
    Returns:
        LongTensor of shape (nsamples, seqlen).
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples}, {seqlen}")
    text = "\n\n".join(_texts_of(texts))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seqlen:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of "
            f"seqlen={seqlen} + 1; pass more text or a smaller seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


@dataclass
class Calibration:
    """Calibration rows in one tensor: ``input_ids`` (n, L), ``attention_mask`` (n, L) or None
    (None = every token is real)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int):
        """Yield ``(start, input_ids, attention_mask)`` over consecutive rows."""
        for start in range(0, len(self), batch_size):
            mask = self.attention_mask
            yield (start, self.input_ids[start : start + batch_size],
                   None if mask is None else mask[start : start + batch_size])


def _check_ids(ids, where: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{where} must hold integer token ids, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{where} must have shape (n, seqlen) with n, seqlen > 0, got "
                         f"{tuple(ids.shape)}")
    return ids.long()


def _rows_from_dicts(items) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise TypeError(f"calibration item {i} must be a dict with 'input_ids', got "
                            f"{type(item).__name__}")
        ids = _check_ids(item["input_ids"], f"calibration item {i} input_ids")
        mask = item.get("attention_mask")
        if mask is not None:
            mask = torch.as_tensor(mask).long().reshape(ids.shape)
        rows += [(ids[j], None if mask is None else mask[j]) for j in range(ids.shape[0])]
    return rows


def _pad_rows(rows) -> Calibration:
    """Right-pad rows of unequal length (pad id 0, masked out); causal attention means the
    real tokens never see the padding."""
    length = max(ids.numel() for ids, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (row, row_mask) in enumerate(rows):
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1 if row_mask is None else row_mask
    return Calibration(ids, None if bool(mask.all()) else mask)


def check_token_ids(calib: Calibration, vocab_size: int) -> None:
    """Refuse ids outside ``[0, vocab_size)`` (the embedding lookup would raise a bare
    ``IndexError``, or read out of bounds on some devices); one min/max over the ids."""
    ids = calib.input_ids
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < vocab_size:
        return
    row, pos = (int(i) for i in ((ids < 0) | (ids >= vocab_size)).nonzero()[0])
    raise ValueError(
        f"calibration token ids must be in [0, {vocab_size}), the vocabulary size "
        f"{vocab_size} of the model's input embedding; got ids from {lo} to {hi} (row {row}, "
        f"position {pos} holds {int(ids[row, pos])}); tokenize with this model's tokenizer")


def as_calibration(calibration) -> Calibration:
    """Normalise a LongTensor (n, seqlen), a list of dicts or a DataLoader of dicts.

    Raises:
        ValueError: empty or wrongly shaped calibration.
        TypeError: float token ids or items that are not dicts with ``input_ids``.
    """
    if calibration is None:
        raise ValueError("method='wanda' needs calibration data (see shears.calibration_data)")
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2:
            raise ValueError("a calibration tensor must have shape (n, seqlen), got "
                             f"{tuple(calibration.shape)}")
        return Calibration(_check_ids(calibration, "calibration"), None)
    rows = _rows_from_dicts(calibration)
    if not rows:
        raise ValueError("the calibration data is empty")
    return _pad_rows(rows)
