"""SQFT's way with shears: one sparse INT4 model out, adapters trained quantization-aware.

    python examples/sqft.py --data ../shared/data           # SmolLM2-135M, a few minutes
    python examples/sqft.py --smoke                         # tiny random Llama, seconds (CI)

1. Wanda prunes the model to 50% (calibration: WikiText-2).
2. ``quantize_base`` rounds the decoder's linear maps to symmetric INT4, one scale per
   ``--group-size`` input columns (64: SmolLM2's hidden size 576 is not a multiple of 128);
   every zero stays a zero.
3. Elastic LoRA with ``sparse_adapter=True`` over that base trains quantization-aware
   (QA-SparsePEFT): the forward uses the grid point of ``W + delta * (W != 0)`` on the
   base's scales, straight-through gradients; ``NLSTrainer`` for ``--steps`` steps.
4. The heuristic sub-adapter, then a short hill-climb on held-out loss.
5. ``merge_adapters``: the merged weights lie on the base's grid and keep every zero, and
   the logits are those of the adapted model.
6. ``export_compressed`` writes a compressed-tensors ``pack-quantized`` checkpoint;
   ``AutoModelForCausalLM.from_pretrained`` reloads it in plain transformers (with
   compressed-tensors installed), logits compared; sizes on disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import shears
from shears.adapters import elastic_modules
from shears.evaluation import InstructionCollator, evaluate_loss, instruction_dataset
from shears.evaluation.paths import data_dir
from shears.evaluation.perplexity import perplexity, wikitext2_ids
from shears.pruning.layers import weight_matrix
from shears.quantization import grid_of, quantized_modules
from shears.quantization.grid import on_grid

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def load(args):
    """(model, tokenizer, calibration ids, perplexity ids or None, math records)."""
    if args.smoke:
        import transformers
        from reproduce import byte_tokenizer  # the smoke tokenizer: one token per byte

        tok = byte_tokenizer()
        config = transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, len(tok), (4, 64), generator=g)
        records = [{"instruction": f"Tom has {a} apples and buys {a + 3} more. How many?",
                    "input": "", "output": f"{a} + {a + 3} = {2 * a + 3}. The answer is "
                    f"{2 * a + 3}."} for a in range(24)]
        return model, tok, calib, None, records
    from smollm2 import load_smollm2

    model, tok = load_smollm2()
    ids = wikitext2_ids(tok, args.data)
    half = ids.numel() // 2  # calibrate on the second half, measure on the first
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(half, ids.numel() - 257, (32,), generator=g)
    calib = torch.stack([ids[s : s + 256] for s in starts.tolist()])
    records = json.loads((data_dir(args.data) / "llm-adapters" / "math_data.json").read_text())
    order = torch.randperm(len(records), generator=g).tolist()
    return model, tok, calib, ids[:half], [records[i] for i in order[:args.records]]


def ppl(model, ids, args) -> str:
    """", WikiText-2 perplexity X" on the first --ppl-windows windows (nothing for --smoke)."""
    if ids is None:
        return ""
    value = perplexity(model, ids, 512, max_windows=args.ppl_windows, progress=False)
    return f", WikiText-2 perplexity {value:.2f}"


def train(model, tok, records, args, out: Path) -> None:
    shears.add_elastic_lora(model, TARGETS, ranks=args.ranks, alpha=2.0 * args.ranks[0],
                            groups="qkv", sparse_adapter=True)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=max(1, args.batch_size // args.micro_batch),
        learning_rate=getattr(args, "lr", 3e-4), max_steps=args.steps, warmup_steps=1,
        logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[], use_cpu=True,
        seed=0)
    trainer = shears.NLSTrainer(
        model=model, args=training_args, data_collator=InstructionCollator(tok),
        train_dataset=instruction_dataset(records, tok, cutoff_len=args.cutoff))
    trainer.train()
    where = "on the INT4 grid (QA)" if quantized_modules(model) else "on the unquantized base"
    print(f"[3] NLS: {trainer.state.global_step} optimizer steps over "
          f"{len(shears.search_space(model))} adapter groups, sparse adapters {where}")


def search(model, tok, records, args) -> dict[str, int]:
    val = instruction_dataset(records, tok, cutoff_len=args.cutoff)
    evaluate = shears.make_evaluator(model, lambda m: evaluate_loss(m, val, batch_size=8))
    heuristic = shears.heuristic_config(model)
    print(f"[4] heuristic sub-adapter: held-out loss {evaluate(heuristic):.4f}")
    result = shears.hill_climb(model, evaluate, budget=args.budget, maximize=False)
    print(f"    hill-climb ({args.budget} evaluations): best held-out loss "
          f"{result.best_score:.4f}, configuration {result.best_config}")
    return result.best_config


@torch.no_grad()
def merge(model, config, ids) -> dict:
    shears.set_config(model, config)
    adapted = model(ids).logits
    zeros = {n: m.base_weight() == 0 for n, m in elastic_modules(model)}
    shears.merge_adapters(model, config)
    maps = quantized_modules(model)
    checks = {
        "merged_diff": (model(ids).logits - adapted).abs().max().item(),
        "on_grid": all(on_grid(weight_matrix(m), grid_of(m).scale, grid_of(m).bits)
                       for m in maps.values()),
        "zeros_kept": all(bool(torch.all(weight_matrix(maps[n])[z] == 0))
                          for n, z in zeros.items()),
    }
    print(f"[5] merge_adapters: {len(zeros)} maps on the INT4 grid: {checks['on_grid']}, "
          f"every zero kept: {checks['zeros_kept']}, logits max abs diff "
          f"{checks['merged_diff']:.2e} from the adapted model")
    return checks


@torch.no_grad()
def export(model, tok, ids, out: Path) -> dict:
    merged = model(ids).logits
    written = shears.export_compressed(model, out / "int4")
    tok.save_pretrained(out / "int4")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "int4").eval()
    diff = (reloaded(ids).logits - merged).abs().max().item()
    size = (out / "int4" / "model.safetensors").stat().st_size
    print(f"[6] export_compressed -> {written.directory}: {len(written.layers)} maps packed in "
          f"{written.packed_bytes / 2**20:.2f} MiB ({written.packed_bytes / written.bf16_bytes:.3f}"
          f"x their bf16 bytes), model.safetensors {size / 2**20:.2f} MiB; reloaded by "
          f"AutoModelForCausalLM.from_pretrained: logits max abs diff {diff:.2e}")
    return {"reload_diff": diff, "packed_ratio": written.packed_bytes / written.bf16_bytes,
            "file_bytes": size}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="QA-SparsePEFT (SQFT) on SmolLM2-135M")
    p.add_argument("--data", default=None, help="data folder (default $SHEARS_DATA_DIR)")
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, seconds")
    p.add_argument("--group-size", type=int, default=None, help="default 64 (smoke: 32)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="default 32 24 16")
    p.add_argument("--records", type=int, default=256, help="training records")
    p.add_argument("--val-records", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--budget", type=int, default=None, help="hill-climb evaluations")
    p.add_argument("--ppl-windows", type=int, default=8)
    args = p.parse_args(argv)
    small = args.smoke
    args.group_size = args.group_size or (32 if small else 64)
    args.ranks = args.ranks or ([8, 6, 4] if small else [32, 24, 16])
    args.steps = args.steps or (2 if small else 16)
    if small:  # one micro-batch of short rows per step
        args.batch_size, args.cutoff = args.micro_batch, 64
    args.budget = args.budget or (3 if small else 6)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="shears-sqft-"))
    model, tok, calib, ppl_ids, records = load(args)
    val_records, records = records[-args.val_records:], records[:-args.val_records]
    report = shears.wanda_prune(model, calib, 0.5, progress=False)
    print(f"[1] Wanda 50%: sparsity {report.sparsity:.2%}{ppl(model, ppl_ids, args)}")
    q = shears.quantize_base(model, bits=4, group_size=args.group_size)
    print(f"[2] quantize_base INT4 group {q.group_size}: {len(q.layers)} maps, sparsity "
          f"{q.sparsity_before:.2%} -> {q.sparsity_after:.2%}, relative error "
          f"{q.relative_error:.4f}{ppl(model, ppl_ids, args)}")
    train(model, tok, records, args, out)
    best = search(model, tok, val_records, args)
    ids = tok(val_records[0]["instruction"], return_tensors="pt").input_ids
    results = merge(model, best, ids)
    results.update(export(model, tok, ids, out))
    if ppl_ids is not None:
        print(f"    merged INT4 model{ppl(model, ppl_ids, args)}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
