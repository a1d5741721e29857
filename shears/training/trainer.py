"""NLSTrainer: a ``transformers.Trainer`` that trains an elastic super-adapter with NLS.

Neural Low-rank adapter Search: before every optimizer step (or, with
``nls_sample_every="micro_batch"``, every micro-batch, as the authors' code) a sampler picks
one rank per adapter group and activates that sub-adapter; forward and backward then run on
the sliced adapters only. Across steps one set of weights learns the whole family of nested
sub-adapters. Everything else is the stock ``Trainer`` (optimizer, schedules, mixed
precision, gradient accumulation and checkpointing, callbacks, ``report_to``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer

from shears.adapters import (
    Config,
    elastic_index,
    elastic_modules,
    get_config,
    heuristic_config,
    maximal_config,
    minimal_config,
    search_space,
    set_config,
    validate_config,
)
from shears.atomic import read_json, write_json

from .history import NLSHistory
from .samplers import Sampler, get_sampler

NLS_STATE_NAME = "nls_state.json"
SAMPLE_EVERY = ("step", "micro_batch")
_NAMED = {"heuristic": heuristic_config, "maximal": maximal_config, "minimal": minimal_config}


def _warn_if_fsdp_dropped(trainer: Trainer) -> None:
    """FSDP was asked for but is off: accelerate (1.15) enables it only in an accelerator
    world (MULTI_GPU, MULTI_NPU, ...); with several CPU processes it silently replicates the
    model instead (DDP). See docs/training.md."""
    if trainer.args.fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        warnings.warn(
            f"TrainingArguments.fsdp is set but accelerate runs "
            f"{trainer.accelerator.distributed_type}, not FSDP: the model is not sharded. "
            "accelerate enables FSDP only with several processes on GPUs (or other "
            "accelerators); on CPU see docs/training.md.", stacklevel=3)


@contextlib.contextmanager
def _elastic_adapters_count_as_adapters() -> Iterator[None]:
    """While ``Trainer.__init__`` runs, let transformers' quantized-model check see the elastic
    adapters. ``validate_quantization_for_training`` refuses a quantized model (a
    bitsandbytes 4-bit base) unless it is a ``PeftModel`` or has a PEFT adapter loaded
    (``_hf_peft_config_loaded``); a model carrying trainable elastic adapters is trained the
    QLoRA way too. For such a model only, the flag is set during that check alone (it also
    changes what ``save_pretrained`` writes, so it must not stay), and every other refusal of
    the check (no trainable adapter, a compiled quantized model, a quantization method that
    cannot train) still applies."""
    import transformers.trainer as hf_trainer

    original = getattr(hf_trainer, "validate_quantization_for_training", None)
    if original is None:  # a transformers without that check
        yield
        return

    def validate(model: nn.Module) -> None:
        trainable = any(m.lora_A.requires_grad or m.lora_B.requires_grad
                        for _, m in elastic_modules(model))
        if not trainable or not getattr(model, "is_quantized", False):
            return original(model)
        had, previous = "_hf_peft_config_loaded" in model.__dict__, \
            model.__dict__.get("_hf_peft_config_loaded")
        model._hf_peft_config_loaded = True
        try:
            return original(model)
        finally:
            if had:
                model._hf_peft_config_loaded = previous
            else:
                del model._hf_peft_config_loaded

    hf_trainer.validate_quantization_for_training = validate
    try:
        yield
    finally:
        hf_trainer.validate_quantization_for_training = original


def _holds_compiled_module(model: nn.Module) -> bool:
    """``torch.compile(model)`` (an OptimizedModule) or ``module.compile()`` anywhere inside."""
    return any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _use_rank_masks(model: nn.Module) -> None:
    """Put every sliced adapter in mask mode (same maths, static shapes), and say so."""
    sliced = [m for _, m in elastic_modules(model) if m.rank_mode != "mask"]
    for m in sliced:
        m.rank_mode = "mask"
    if sliced:
        warnings.warn(
            f"torch.compile: {len(sliced)} elastic adapters switched to rank_mode='mask' "
            "(static shapes: one graph for every configuration, at the cost of r_max work per "
            "step); pass rank_mode='mask' to add_elastic_lora to make this explicit",
            stacklevel=3,
        )


class NLSTrainer(Trainer):
    """``Trainer`` plus Neural Low-rank adapter Search over the model's elastic adapters.

    Args (besides everything ``Trainer`` takes):
        nls_sampler: ``"uniform"`` (each group draws its rank uniformly), ``"sandwich"``
            (maximal, minimal and uniform steps in rotation) or a callable
            ``(space, rng, step) -> config``.
        nls_seed: seed of the sampler's ``numpy`` generator; ``None`` uses ``args.seed``.
            Every process seeds it the same way, so all ranks train the same sub-adapter.
        eval_config: the sub-adapter used by ``evaluate``/``predict``: ``"heuristic"``,
            ``"maximal"``, ``"minimal"`` or a complete config dict.
        nls_sample_every: ``"step"`` (default): one sub-adapter per optimizer step, shared by
            its micro-batches of gradient accumulation; ``"micro_batch"``: a new draw at the
            top of every micro-batch, so one update averages the gradients of several
            sub-adapters (the authors' patched Trainer: NNCF's scheduler steps per
            micro-batch with ``sample_rate`` 1). The sampler's ``step`` argument is then the
            micro-batch's index in the run.

    Under ``torch.compile`` (``args.torch_compile`` or a model that is, or holds, a compiled
    module) the adapters are switched to ``rank_mode="mask"`` with a warning: sliced ranks
    change tensor shapes, so the compiled model would recompile at every configuration until
    dynamo's recompile limit, then run eagerly (docs/training.md, "torch.compile").

    After ``train()``, ``trainer.nls_history`` holds the configuration and loss of every step
    (of every micro-batch under ``"micro_batch"``).
    A step adds no host synchronisation: its loss stays on the device until the history is
    read (by a log, a checkpoint or the user), then all pending losses move in one transfer.
    """

    def __init__(
        self,
        *args: Any,
        nls_sampler: str | Sampler = "uniform",
        nls_seed: int | None = None,
        eval_config: str | Mapping[str, int] = "heuristic",
        nls_sample_every: str = "step",
        **kwargs: Any,
    ) -> None:
        if nls_sample_every not in SAMPLE_EVERY:
            raise ValueError(f"nls_sample_every must be one of {list(SAMPLE_EVERY)}: "
                             f"{nls_sample_every!r}")
        with _elastic_adapters_count_as_adapters():  # a 4-bit base (QLoRA-style) trains too
            super().__init__(*args, **kwargs)
        self.nls_sample_every = nls_sample_every
        _warn_if_fsdp_dropped(self)
        self.nls_space = search_space(self.model)  # raises if there are no elastic adapters
        if self.args.torch_compile or _holds_compiled_module(self.model):
            _use_rank_masks(self.model)
        self.nls_sampler = get_sampler(nls_sampler)
        self.nls_seed = self.args.seed if nls_seed is None else int(nls_seed)
        self.nls_rng = np.random.default_rng(self.nls_seed)
        self.eval_config = self._resolve_eval_config(eval_config)
        self._nls_step: int | None = None  # optimizer step whose config is active
        self._nls_loss: torch.Tensor | None = None  # that step's loss, summed over micro-batches
        self._nls_config: Config = {}
        self._nls_micro = 0  # micro-batches trained in this run ("micro_batch" mode)
        # (step, micro-batch index or None, config, loss still on the device)
        self._nls_pending: list[tuple[int, int | None, Config, torch.Tensor]] = []
        self.nls_history = NLSHistory()

    @property
    def nls_history(self) -> NLSHistory:
        """One record per finished optimizer step, or per micro-batch (see ``NLSHistory``).

        Reading it completes the records whose loss is still on the device, all in one
        transfer: the only host synchronisation NLS adds, and only when someone reads.
        """
        self._finish_nls_step()
        if self._nls_pending:
            losses = torch.stack([loss for *_, loss in self._nls_pending]).tolist()
            for (step, micro, config, _), loss in zip(self._nls_pending, losses, strict=True):
                self._nls_history.append(step, config, loss, micro_batch=micro)
            self._nls_pending.clear()
        return self._nls_history

    @nls_history.setter
    def nls_history(self, history: NLSHistory) -> None:
        """Replace the history (a resumed checkpoint's); its records count as already logged."""
        self._nls_history = history
        self._nls_pending.clear()
        self._nls_logged = len(history.records)  # records already summarised in the logs
        self._nls_rank_totals = _rank_totals(history.records)  # over those records

    def _resolve_eval_config(self, spec: str | Mapping[str, int]) -> Config:
        if isinstance(spec, str):
            if spec not in _NAMED:
                raise ValueError(f"eval_config must be one of {list(_NAMED)} or a dict: {spec!r}")
            return _NAMED[spec](self.nls_space)
        config = validate_config(self.nls_space, spec)
        missing = [g for g in self.nls_space if g not in config]
        if missing:
            raise ValueError(f"eval_config lacks {len(missing)} groups, e.g. {missing[:3]}")
        return config

    # ---- one configuration per optimizer step, or per micro-batch ----------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Activate a sub-adapter, then train as usual: on the first micro-batch of an
        optimizer step (``"step"``), or on every micro-batch (``"micro_batch"``).

        ``global_step`` only advances after the optimizer step, so under ``"step"`` every
        micro-batch of gradient accumulation sees the same configuration. Either way the
        configuration is set before ``Trainer.training_step`` runs forward and backward, so
        gradient-checkpoint recomputation inside backward sees the micro-batch's own. The
        switch reuses the model's cached ``ElasticIndex`` (no walk of the module tree) and
        nothing here waits for the device.
        """
        if self.nls_sample_every == "micro_batch":
            return self._micro_batch_step(model, inputs, num_items_in_batch)
        step = self.state.global_step
        if self._nls_step != step:
            self._finish_nls_step()
            config = self.nls_sampler(self.nls_space, self.nls_rng, step)
            # The complete active config, even if the sampler's was partial.
            self._nls_config = elastic_index(self.model).set(config)
            self._nls_step, self._nls_loss = step, None
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nls_loss = loss if self._nls_loss is None else self._nls_loss + loss
        return loss

    def _micro_batch_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        """One draw, one micro-batch; its record is queued at once (loss on the device).

        The recorded loss is the micro-batch's share of the step's loss times the number of
        micro-batches in the step (``current_gradient_accumulation_steps``, smaller in an
        epoch's last, partial window), so that the mean of a step's records is the loss
        ``Trainer`` logs for the step, and records are comparable with ``"step"`` mode's.
        """
        index = self._nls_micro
        config = self.nls_sampler(self.nls_space, self.nls_rng, index)
        self._nls_config = elastic_index(self.model).set(config)
        loss = super().training_step(model, inputs, num_items_in_batch)
        window = getattr(self, "current_gradient_accumulation_steps", None)
        window = window or self.args.gradient_accumulation_steps
        self._nls_pending.append((self.state.global_step, index, self._nls_config, loss * window))
        self._nls_micro = index + 1
        return loss

    def _finish_nls_step(self) -> None:
        """Queue the finished step (config, loss on the device) once; no host synchronisation."""
        if self._nls_loss is None or self._nls_step is None:
            return
        if self.state.global_step <= self._nls_step:
            return  # the step is still accumulating micro-batches
        self._nls_pending.append((self._nls_step, None, self._nls_config, self._nls_loss))
        self._nls_loss = None

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; the sampler's stream continues across calls unless resumed."""
        self._nls_step, self._nls_loss = None, None  # global_step restarts at 0
        self._nls_micro = 0  # so does the micro-batch index (a resume restores both)
        try:
            return super().train(*args, **kwargs)
        finally:
            self._finish_nls_step()  # queued; completed when the history is read

    # ---- evaluation runs one fixed sub-adapter ---------------------------------------------

    @contextlib.contextmanager
    def eval_sub_adapter(self, config: Mapping[str, int] | None = None) -> Iterator[Config]:
        """Activate ``config`` (default ``eval_config``) and restore the training config after."""
        saved = get_config(self.model)
        config = dict(self.eval_config if config is None else config)
        set_config(self.model, config)
        try:
            yield config
        finally:
            set_config(self.model, saved)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self.eval_sub_adapter():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any):
        with self.eval_sub_adapter():
            return super().predict(*args, **kwargs)

    # ---- statistics in the logs --------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add NLS statistics to the training logs: mean active rank since the last log and
        the share of all sampled group-ranks so far that took each rank value. Reading the
        history here costs nothing extra: ``Trainer`` has just read its loss from the device."""
        history = self.nls_history if "loss" in logs else None
        if history is not None and history.records:
            recent = history.records[self._nls_logged :]
            ranks = [r for rec in recent for r in rec["config"].values()]
            if ranks:
                logs["nls_mean_rank"] = float(np.mean(ranks))
            totals = self._nls_rank_totals  # updated with the new records only, not recounted
            for rank, n in _rank_totals(recent).items():
                totals[rank] = totals.get(rank, 0) + n
            n_all = sum(totals.values())
            for rank in sorted(totals, reverse=True):
                logs[f"nls_freq_r{rank}"] = totals[rank] / n_all
            self._nls_logged = len(history.records)
        super().log(logs, start_time)

    # ---- the sampler's state travels with the checkpoint -----------------------------------

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.should_save:  # identical on every process: one JSON file, no pickle
            # Saved after an optimizer step: the generator has made exactly the draws of the
            # micro-batches trained so far (an epoch's last window may be partial).
            state = {
                "nls_seed": self.nls_seed,
                "rng": self.nls_rng.bit_generator.state,
                "sample_every": self.nls_sample_every,
                "micro_batches": self._nls_micro,
                "history": self.nls_history.to_dict(),
            }
            # atomic: a kill leaves the previous file (or none), never a truncated one
            write_json(os.path.join(output_dir, NLS_STATE_NAME), state, indent=None)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = os.path.join(checkpoint, NLS_STATE_NAME) if checkpoint else None
        if path is None or not os.path.isfile(path):
            return
        state = read_json(path, "NLS sampler state")
        saved_mode = state.get("sample_every", "step")  # files before the switch: "step"
        if saved_mode != self.nls_sample_every:
            raise ValueError(f"{path} was trained with nls_sample_every={saved_mode!r}, this "
                             f"trainer has {self.nls_sample_every!r}: resume with the same mode")
        self.nls_rng.bit_generator.state = state["rng"]
        self._nls_micro = int(state.get("micro_batches", 0))
        self.nls_history = NLSHistory.from_dict(state["history"])
        self._nls_step, self._nls_loss = None, None


def _rank_totals(records: list[dict[str, Any]]) -> dict[int, int]:
    """Rank -> how many group draws of ``records`` took it."""
    totals: dict[int, int] = {}
    for rec in records:
        for rank in rec["config"].values():
            totals[rank] = totals.get(rank, 0) + 1
    return totals
