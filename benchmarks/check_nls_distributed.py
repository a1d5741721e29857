"""Two processes train one super-adapter with NLS; every step must use the same sub-adapter.

    torchrun --standalone --nproc_per_node 2 benchmarks/check_nls_distributed.py [--steps 6]

Each process seeds the sampler identically, so no communication is needed to agree on the
configuration; DDP then averages gradients of the same slices. The script trains once per
sampling mode (``nls_sample_every`` "step" and "micro_batch", in the same processes),
gathers every process's sampled configurations and final adapter weights and checks on
rank 0 that they are identical (exit code 1 otherwise). Prints ``NLS-DISTRIBUTED-OK`` on
success.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import make_tiny, random_ids  # noqa: E402

from shears.adapters import add_elastic_lora  # noqa: E402
from shears.training import NLSTrainer  # noqa: E402


def train(steps: int, every: str) -> dict:
    """Train on this process's data shard; return its configs, losses and adapter weights."""
    model = add_elastic_lora(make_tiny("llama"), ["q_proj", "v_proj", "up_proj", "down_proj"],
                             ranks=[16, 8, 4])
    ids = random_ids(64, 16)
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=steps, learning_rate=1e-2,
        use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=100, seed=0, ddp_find_unused_parameters=False,
    )
    trainer = NLSTrainer(model=model, args=args, train_dataset=data, nls_seed=7,
                         nls_sample_every=every)
    trainer.train()
    return {
        "configs": [r["config"] for r in trainer.nls_history.records],
        "losses": [r["loss"] for r in trainer.nls_history.records],
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
    }


def check(everyone: list[dict], steps: int, every: str) -> bool:
    """On rank 0: every process drew the same configs and holds the same adapter weights."""
    ref, ok = everyone[0], len(everyone) == 2
    draws = steps * (2 if every == "micro_batch" else 1)  # 2 accumulated micro-batches
    assert len(ref["configs"]) == draws, len(ref["configs"])
    print(f"nls_sample_every={every}:")
    for r, other in enumerate(everyone[1:], start=1):
        same_cfg = other["configs"] == ref["configs"]
        same_w = all(torch.equal(other["weights"][n], w) for n, w in ref["weights"].items())
        print(f"rank {r}: same configs {same_cfg}, same adapter weights {same_w}, "
              f"local losses differ (own data shard): {other['losses'] != ref['losses']}")
        ok = ok and same_cfg and same_w
    distinct = len({tuple(c.values()) for c in ref["configs"]})
    print(f"world {len(everyone)}, {steps} steps, {draws} draws, {distinct} distinct "
          "configurations")
    return ok and distinct > 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    opts = parser.parse_args()
    torch.set_num_threads(1)  # two processes on two cores
    ok = True
    for every in ("step", "micro_batch"):
        mine = train(opts.steps, every)
        gc.collect()  # drop the trainer's DDP wrapper before the process group goes away
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        ok = (check(everyone, opts.steps, every) if dist.get_rank() == 0 else False) and ok
    if dist.get_rank() == 0:
        print("NLS-DISTRIBUTED-OK" if ok else "NLS-DISTRIBUTED-FAILED", flush=True)
    flag = torch.tensor([int(ok)])
    dist.broadcast(flag, 0)
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
