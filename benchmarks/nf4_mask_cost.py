"""What ``sparse_adapter=True`` over an NF4 base pays for recomputing its mask every call.

    python benchmarks/nf4_mask_cost.py [--tokens 512] [--repeats 20]

For each map shape of SmolLM2-135M (Q/O 576 x 576, K/V 192 x 576, Up 1536 x 576, Down
576 x 1536), a 50%-sparse random weight in a bitsandbytes NF4 ``Linear4bit`` (CPU, one
thread): the time of the mask (dequantize + compare, what ``ElasticLoRALinear`` does per
forward) against the time of the 4-bit map's own forward + backward on ``--tokens`` tokens;
best of ``--repeats``; and the bytes a cached mask would take next to the NF4 weight.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from shears.quantization import require
from shears.quantization.bnb import dequantized_weight

SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "up": (1536, 576), "down": (576, 1536)}


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def nf4_map(out_f: int, in_f: int) -> nn.Module:
    bnb = require("bitsandbytes")
    w = torch.randn(out_f, in_f)
    w[torch.rand_like(w) < 0.5] = 0
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                     compress_statistics=False)  # as transformers loads it
    return layer.to("cpu").train()  # quantizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| map (out x in) | mask ms | NF4 map fwd+bwd ms | mask / map | NF4 KiB | bool mask "
          "KiB | bit-packed KiB |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, (out_f, in_f) in SHAPES.items():
        layer = nf4_map(out_f, in_f)
        x = torch.randn(args.tokens, in_f, requires_grad=True)
        mask = best_ms(lambda: dequantized_weight(layer) != 0, args.repeats)  # noqa: B023
        step = best_ms(lambda: layer(x).sum().backward(), args.repeats)  # noqa: B023
        state = layer.weight.quant_state
        nf4 = layer.weight.numel() + state.absmax.numel() * state.absmax.element_size()
        n = out_f * in_f
        print(f"| {name} ({out_f} x {in_f}) | {mask:.2f} | {step:.2f} | {mask / step:.3f} | "
              f"{nf4 / 1024:.0f} | {n / 1024:.0f} ({n / nf4:.2f}x) | {n / 8 / 1024:.0f} |")


if __name__ == "__main__":
    main()
