"""Mean token loss on an instruction dataset: a cheap judge for sub-adapter search."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shears.evaluation.data import IGNORE_INDEX, InstructionCollator


@torch.no_grad()
def evaluate_loss(model: Any, dataset: Any, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token cross-entropy over all label tokens of ``dataset``.

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, seqlen, vocab).
        dataset: rows with ``input_ids`` and ``labels`` (and optionally ``attention_mask``),
            e.g. from :func:`~shears.evaluation.instruction_dataset`; labels -100 are skipped.

    The mean is over tokens, not over batches or records: every label token weighs the
    same whatever its batch, so the value does not depend on ``batch_size``.
    """
    rows = [dataset[i] for i in range(len(dataset))]
    rows.sort(key=lambda r: -len(r["input_ids"]))  # similar lengths together: less padding
    collate = InstructionCollator(tokenizer=None)  # pad id is irrelevant: masked out
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)  # summed in fp64: many tokens
    count = 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="loss", disable=not progress,
                          leave=False):
            batch = collate(rows[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}  # (b, t), right-padded
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits[:, :-1].float()  # (b, t - 1, vocab)
            targets = batch["labels"][:, 1:]  # (b, t - 1): token t + 1 is predicted at t
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").double().cpu()
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the dataset has no label tokens (all -100)")
    return total.item() / count
