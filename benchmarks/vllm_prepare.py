"""The artefacts vLLM is checked on, and transformers' answers on them (the main env's half).

    python benchmarks/vllm_prepare.py --model tiny --out /tmp/vllm-tiny          # seconds (CI)
    python benchmarks/vllm_prepare.py --model smollm2 --data ../shared/data --out DIR

Then ``benchmarks/vllm_check.py DIR`` (run with the vLLM environment's python) serves them
and compares. Written under ``--out``:

- ``pruned/``: the Wanda-50% base (``save_pretrained``, fp32, with its tokenizer).
- ``int4/``: (a) the same base, ``quantize_base`` INT4 (symmetric, per group), QA-SparsePEFT
  adapters over it merged on the grid, ``export_compressed`` (pack-quantized, W4A16).
- ``peft/``: (b) dense elastic adapters over ``pruned/``, the heuristic sub-adapter written by
  ``export_peft`` (ranks differ per module: ``rank_pattern`` / ``alpha_pattern``).
- ``reference.json``: transformers' per-token log-probabilities of the WikiText-2 windows on
  ``int4/`` reloaded by ``from_pretrained`` in fp32 and in bf16 (the bf16 noise), and the
  greedy continuations of the prompts by the pruned base and by base + PEFT (stock
  ``PeftModel``), in fp32 and bf16; only prompts whose base and adapted continuations differ.

The tiny model is a random Llama with vLLM-friendly shapes (head size 64: vLLM's CPU attention
takes 32, 64, 80, ...; every map a multiple of 32: its W4A16 kernel's tile) and a byte
tokenizer; its adapters get random values. SmolLM2's dense adapters are trained with NLS for
``--steps`` steps on LLM-Adapters' math data (quickstart.py's recipe), its QA adapters too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers as T
from tqdm.auto import tqdm

import shears
from shears.atomic import write_json
from shears.evaluation import format_prompt
from shears.evaluation.paths import data_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# (b) keeps a prompt only if no greedy step of the fp32 reference is a near-tie: a top-1 /
# top-2 logit gap below this can flip between two correct fp32 implementations.
MIN_MARGIN = 0.01


def tiny_model():
    """``(model, tokenizer)``: a seeded random Llama (2 blocks, width 256, head size 64)."""
    from reproduce import byte_tokenizer

    tok = byte_tokenizer()
    config = T.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, bos_token_id=tok.eos_token_id,
                           eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper next-token distributions: fewer near-ties for greedy
        model.lm_head.weight.mul_(30.0)
    return model, tok


def windows(tok, args) -> torch.Tensor:
    """(a)'s windows: the first ``--windows`` ``--seqlen``-token windows of WikiText-2's first
    half (wikitext_protocol.py, as bench_prune.py), shape (windows, seqlen)."""
    from wikitext_protocol import protocol_ids

    _, _, ppl_ids = protocol_ids(tok, args.data)
    n = min(args.windows, ppl_ids.numel() // args.seqlen)
    return ppl_ids[: n * args.seqlen].view(n, args.seqlen)


def calibration(tok, args) -> torch.Tensor:
    from wikitext_protocol import protocol_ids

    return protocol_ids(tok, args.data)[1][: args.nsamples]


def randomize(model, seed: int, scale: float) -> None:
    """Random A and B for every trainable adapter tensor (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def nls_train(model, tok, records, args, out: Path) -> None:
    """quickstart.py's NLS recipe for ``--steps`` optimizer steps."""
    from quickstart import train

    ns = argparse.Namespace(batch_size=8, micro_batch=4, epochs=1.0, steps=args.steps,
                            cutoff=256)
    train(model, tok, records, ns, out)


def math_records(args) -> list[dict]:
    records = json.loads((data_dir(args.data) / "llm-adapters" / "math_data.json").read_text())
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    return [records[i] for i in order]


def make_int4(pruned: Path, args, out: Path) -> None:
    """(a): quantize_base -> QA-SparsePEFT adapters -> merge on the grid -> export_compressed."""
    model = T.AutoModelForCausalLM.from_pretrained(pruned).eval()
    shears.quantize_base(model, bits=4, group_size=args.group_size)
    shears.add_elastic_lora(model, TARGETS, ranks=(32, 24, 16), alpha=64.0, groups="qkv",
                            sparse_adapter=True)
    randomize(model, seed=1, scale=0.01)  # small: a QA merge that moves a few grid points
    shears.set_config(model, shears.heuristic_config(model))
    shears.merge_adapters(model)
    shears.export_compressed(model, out / "int4")
    T.AutoTokenizer.from_pretrained(pruned).save_pretrained(out / "int4")


def make_peft(pruned: Path, tok, args, out: Path) -> None:
    """(b): dense elastic adapters over the pruned base, the heuristic sub-adapter exported."""
    model = T.AutoModelForCausalLM.from_pretrained(pruned).eval()
    if args.model == "tiny":
        shears.add_elastic_lora(model, TARGETS, ranks=(32, 24, 16), alpha=64.0, groups="qkv")
        randomize(model, seed=2, scale=0.05)
    else:
        nls_train(model, tok, math_records(args)[: args.train_records], args, out)
    shears.set_config(model, shears.heuristic_config(model))
    shears.export_peft(model, out / "peft", base_model_name_or_path=str(pruned))


@torch.no_grad()
def token_logprobs(model, wins: torch.Tensor) -> list[list[float]]:
    """log p(token t | tokens < t) for t = 1..seqlen-1 of every window, in fp32."""
    rows = []
    for w in tqdm(wins, desc="transformers logprobs", leave=False):
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        rows.append(logits.log_softmax(-1).gather(1, w[1:, None])[:, 0].tolist())
    return rows


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """``n`` greedy tokens after ``prompt`` (hand-written loop, KV cache, no EOS stop) and the
    smallest top-1 / top-2 logit margin met on the way."""
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    tokens, margin = [], float("inf")
    for _ in range(n):
        logits = out.logits[0, -1].float()
        top = logits.topk(2)
        margin = min(margin, (top.values[0] - top.values[1]).item())
        tokens.append(int(top.indices[0]))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens, margin


def prompts(tok, args) -> list[list[int]]:
    """(b)'s prompts: random bytes (tiny) or held-out math questions in the Alpaca template."""
    if args.model == "tiny":
        g = torch.Generator().manual_seed(3)
        return torch.randint(0, 256, (args.prompts, 24), generator=g).tolist()
    records = math_records(args)[-args.prompts:]  # never among the training records
    return [tok(format_prompt(r["instruction"])).input_ids for r in records]


def greedy_reference(out: Path, tok, args) -> list[dict]:
    """Per prompt: greedy tokens of the pruned base and of base + PEFT, fp32 and bf16."""
    from peft import PeftModel

    rows = [{"prompt": p} for p in prompts(tok, args)]
    for dtype in ("float32", "bfloat16"):
        base = T.AutoModelForCausalLM.from_pretrained(out / "pruned", dtype=dtype).eval()
        for row in tqdm(rows, desc=f"base greedy {dtype}", leave=False):
            row[f"base_{dtype}"], row[f"base_margin_{dtype}"] = greedy(base, row["prompt"],
                                                                       args.new_tokens)
        adapted = PeftModel.from_pretrained(base, str(out / "peft")).eval()
        for row in tqdm(rows, desc=f"PEFT greedy {dtype}", leave=False):
            row[f"lora_{dtype}"], row[f"lora_margin_{dtype}"] = greedy(adapted, row["prompt"],
                                                                       args.new_tokens)
    return rows


def reference(out: Path, tok, wins: torch.Tensor, args) -> dict:
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        int4 = T.AutoModelForCausalLM.from_pretrained(out / "int4", dtype=dtype).eval()
        ppl[dtype] = token_logprobs(int4, wins)
    rows = greedy_reference(out, tok, args)
    changed = [r for r in rows if r["base_float32"] != r["lora_float32"]
               and min(r["base_margin_float32"], r["lora_margin_float32"]) >= MIN_MARGIN]
    if len(changed) < len(rows) // 2:
        raise RuntimeError(f"only {len(changed)} of {len(rows)} prompts have a greedy output "
                           f"that the adapter changes and no fp32 near-tie (< {MIN_MARGIN})")
    return {"model": args.model, "windows": wins.tolist(), "logprobs": ppl,
            "greedy": changed, "prompts_tried": len(rows), "new_tokens": args.new_tokens,
            "max_lora_rank": 32}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="artefacts and transformers references for vLLM")
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="data folder (default $SHEARS_DATA_DIR)")
    p.add_argument("--windows", type=int, default=None, help="(a): default 40 (tiny 8)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=32, help="Wanda calibration windows")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--prompts", type=int, default=None, help="(b): default 32 (tiny 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 32 (tiny 16)")
    p.add_argument("--steps", type=int, default=24, help="SmolLM2: NLS optimizer steps")
    p.add_argument("--train-records", type=int, default=512)
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    args.windows = args.windows or (8 if tiny else 40)
    args.prompts = args.prompts or (16 if tiny else 32)
    args.new_tokens = args.new_tokens or (16 if tiny else 32)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    if args.model == "tiny":
        model, tok = tiny_model()
    else:
        from smollm2 import load_smollm2

        model, tok = load_smollm2()
    shears.wanda_prune(model, calibration(tok, args), 0.5, progress=False)
    model.save_pretrained(out / "pruned")
    tok.save_pretrained(out / "pruned")
    make_int4(out / "pruned", args, out)
    make_peft(out / "pruned", tok, args, out)
    ref = reference(out, tok, windows(tok, args), args)
    write_json(out / "reference.json", ref)
    print(f"wrote {out}: {len(ref['windows'])} windows, {len(ref['greedy'])} of "
          f"{ref['prompts_tried']} prompts changed by the adapter")
    return ref


if __name__ == "__main__":
    main()
