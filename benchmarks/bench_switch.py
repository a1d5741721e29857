"""Cost of NLSTrainer's per-step configuration switch (sample + set), old path vs new path.

    flock /tmp/shears-bench.lock python benchmarks/bench_switch.py

A switch is what ``NLSTrainer.training_step`` does once per optimizer step: the uniform
sampler draws a configuration from the search space, the model's adapters take it, and the
complete active configuration is read back for the history. Models: Llama module trees with
the real block counts of a 7B (32 blocks) and a 70B (80 blocks) model, targets Q, K, V, Up,
Down (160 / 400 adapters), grouped per module (160 / 400 rank variables) or as in the paper
(Q, K, V together; Up; Down: 96 / 240). Widths are tiny (hidden 32): the switch touches
module objects, never weights, so its cost does not depend on them.

``old`` is the code before the adapter index (commit bf3d917), copied below: every switch
walked the module tree four times and re-validated the search space. ``new`` is the
library's path: ``uniform_sampler`` + ``elastic_index(model).set``. Both run in the same
process on the same model, alternating, from equal generators; the script checks that they
draw the same configurations and leave the same ranks on every module.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping
from numbers import Integral

import numpy as np
import transformers as T
from torch import nn

from shears.adapters import ElasticLoRALinear, add_elastic_lora, elastic_index, search_space
from shears.adapters.layer import validate_ranks
from shears.training import uniform_sampler

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
GROUPINGS = {"module": "module", "paper": "qkv"}


# ---- the old path (shears/adapters/config.py at bf3d917, the functions a switch used) -----

def _old_grouped(model: nn.Module) -> dict[str, list[ElasticLoRALinear]]:
    groups: dict[str, list[ElasticLoRALinear]] = {}
    for name, m in model.named_modules():
        if isinstance(m, ElasticLoRALinear):
            groups.setdefault(m.group if m.group is not None else name, []).append(m)
    return groups


def _old_as_int(rank: object, group: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, Integral):
        raise ValueError(f"group {group!r}: rank must be an int, got {rank!r}")
    return int(rank)


def _old_search_space(x: nn.Module | Mapping) -> dict[str, list[int]]:
    if isinstance(x, nn.Module):
        space: dict[str, list[int]] = {}
        for group, modules in _old_grouped(x).items():
            for m in modules:
                if group in space and space[group] != list(m.ranks):
                    raise ValueError(f"group {group!r} mixes rank lists")
                space[group] = list(m.ranks)
        return space
    return {g: list(validate_ranks([_old_as_int(r, g) for r in ranks])) for g, ranks in x.items()}


def _old_set_config(model: nn.Module, config: Mapping[str, int]) -> None:
    groups, space = _old_grouped(model), _old_search_space(model)
    valid = {}
    for group, rank in config.items():
        r = _old_as_int(rank, group)
        if group not in space or r not in space[group]:
            raise ValueError(f"bad rank {rank!r} for {group!r}")
        valid[group] = r
    for group, rank in valid.items():
        for m in groups[group]:
            m.active_rank = rank


def _old_get_config(model: nn.Module) -> dict[str, int]:
    config = {}
    for group, modules in _old_grouped(model).items():
        ranks = {m.active_rank for m in modules}
        if len(ranks) != 1:
            raise ValueError(f"adapters of group {group!r} disagree")
        config[group] = ranks.pop()
    return config


def old_switch(model: nn.Module, space: dict, rng: np.random.Generator) -> dict[str, int]:
    """Old ``training_step`` switch: random_config(space) validated the space on every call."""
    config = {g: int(r[rng.integers(len(r))]) for g, r in _old_search_space(space).items()}
    _old_set_config(model, config)
    return _old_get_config(model)


def new_switch(model: nn.Module, space: dict, rng: np.random.Generator) -> dict[str, int]:
    """Today's ``training_step`` switch."""
    return elastic_index(model).set(uniform_sampler(space, rng, 0))


# ---- the measurement ------------------------------------------------------------------

def llama_tree(blocks: int, grouping: str) -> nn.Module:
    """A Llama with ``blocks`` decoder blocks, hidden 32, elastic adapters on the targets."""
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=blocks,
                           num_attention_heads=1, num_key_value_heads=1, vocab_size=64)
    model = T.LlamaForCausalLM(config)
    return add_elastic_lora(model, TARGETS, ranks=[32, 24, 16], groups=GROUPINGS[grouping])


def time_switches(fn: Callable, model: nn.Module, space: dict, seed: int, n: int) -> float:
    """Seconds per switch over ``n`` switches."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(n):
        fn(model, space, rng)
    return (time.perf_counter() - start) / n


def check_same(model: nn.Module, space: dict, n: int) -> None:
    """Equal generators: the old and new paths draw and apply the same configurations."""
    ra, rb = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(n):
        a = old_switch(model, space, ra)
        ranks_a = [m.active_rank for m in model.modules() if isinstance(m, ElasticLoRALinear)]
        b = new_switch(model, space, rb)
        ranks_b = [m.active_rank for m in model.modules() if isinstance(m, ElasticLoRALinear)]
        if a != b or list(a) != list(b) or ranks_a != ranks_b:
            raise AssertionError("the old and new switch paths disagree")


def measure(blocks: int, grouping: str, switches: int, repeats: int) -> dict:
    model = llama_tree(blocks, grouping)
    space = search_space(model)
    check_same(model, space, 5)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(repeats):  # alternate, so that drifting load hits both paths alike
        times["old"].append(time_switches(old_switch, model, space, i, switches))
        times["new"].append(time_switches(new_switch, model, space, i, switches))
    adapters = sum(isinstance(m, ElasticLoRALinear) for m in model.modules())
    return {"blocks": blocks, "grouping": grouping, "adapters": adapters, "groups": len(space),
            "modules": sum(1 for _ in model.modules()), **times}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 80])
    p.add_argument("--switches", type=int, default=200, help="switches per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path (alternating)")
    opts = p.parse_args(argv)
    rows = [measure(b, g, opts.switches, opts.repeats) for b in opts.blocks for g in GROUPINGS]
    print(f"| blocks | grouping | adapters | groups | modules | old ms/switch (median of "
          f"{opts.repeats}) | new ms/switch (median) | new, best | old/new |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        old, new = statistics.median(r["old"]), statistics.median(r["new"])
        print(f"| {r['blocks']} | {r['grouping']} | {r['adapters']} | {r['groups']} | "
              f"{r['modules']} | {old * 1e3:.3f} | {new * 1e3:.3f} | {min(r['new']) * 1e3:.3f} | "
              f"{old / new:.1f} |")
    return rows


if __name__ == "__main__":
    main()
