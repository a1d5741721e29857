"""Shears stage 2 on SmolLM2-135M: Wanda-prune, attach elastic LoRA, train it with NLS.

    python examples/train_nls.py --data ../shared/data --steps 40 --out /tmp/shears-nls

Prunes the model to 50% (Wanda, calibration on math_data.json), attaches a super-adapter
with the paper's grouping (Q, K, V share one rank; Up; Down; per block; ranks [32, 24, 16],
alpha 64), trains it with ``NLSTrainer`` on math_data.json (LLM-Adapters prompt template),
prints the held-out loss of the minimal, heuristic and maximal sub-adapters, and saves the
super-adapter. A CPU run of the defaults takes a few minutes; the paper trains 3 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from smollm2 import load_smollm2
from transformers import TrainingArguments

from shears import add_elastic_lora, calibration_data, save_adapter, wanda_prune
from shears.adapters import heuristic_config, maximal_config, minimal_config, set_config
from shears.evaluation import InstructionCollator, evaluate_loss, instruction_dataset
from shears.training import NLSTrainer

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="LLM-Adapters folder (default $SHEARS_DATA_DIR)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--train-records", type=int, default=400)
    p.add_argument("--eval-records", type=int, default=64)
    p.add_argument("--out", default="/tmp/shears-nls")
    args = p.parse_args()
    data = None if args.data is None else f"{args.data.rstrip('/')}/llm-adapters"

    model, tok = load_smollm2()
    records = load_task_file(data)
    train = records[: args.train_records]
    held_out = records[-args.eval_records :]
    calib = calibration_data(tok, [r["instruction"] + r["output"] for r in held_out],
                             nsamples=16, seqlen=128)
    wanda_prune(model, calib, sparsity=0.5)

    add_elastic_lora(model, TARGETS, ranks=(32, 24, 16), alpha=64.0, groups="qkv")
    train_ds = instruction_dataset(train, tok, cutoff_len=args.cutoff)
    eval_ds = instruction_dataset(held_out, tok, cutoff_len=args.cutoff)
    trainer = NLSTrainer(
        model=model,
        args=TrainingArguments(args.out, max_steps=args.steps, learning_rate=3e-4,
                               per_device_train_batch_size=args.batch, logging_steps=10,
                               save_strategy="no", report_to="none",
                               use_cpu=not torch.cuda.is_available()),
        train_dataset=train_ds, data_collator=InstructionCollator(tok),
        nls_sampler="uniform", eval_config="heuristic",
    )
    trainer.train()
    model.eval()
    for label, config in (("minimal", minimal_config(model)),
                          ("heuristic", heuristic_config(model)),
                          ("maximal", maximal_config(model))):
        set_config(model, config)
        print(f"held-out loss, {label} sub-adapter: {evaluate_loss(model, eval_ds):.4f}")
    set_config(model, heuristic_config(model))
    print(f"super-adapter saved to {save_adapter(model, args.out + '/super-adapter')}")


def load_task_file(path: str | None) -> list[dict]:
    """The math_data.json fine-tuning records (instruction, input, output, answer)."""
    folder = Path(path or Path(os.environ["SHEARS_DATA_DIR"]) / "llm-adapters")
    return json.loads((folder / "math_data.json").read_text())


if __name__ == "__main__":
    main()
