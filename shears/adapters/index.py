"""Which elastic adapters a model carries, resolved once: the cheap configuration switch.

NLS switches the sub-adapter at every optimizer step, the search at every evaluation. A
walk of the module tree costs about 0.4 ms for the ~750 modules of a 7B Llama skeleton
(1 ms at 70B) on one CPU core, so switches must not walk: ``ElasticIndex`` walks once and
keeps group -> adapters and the validated search space; ``elastic_index(model)`` caches it
on the model and rebuilds it whenever it no longer describes the model (``is_current``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from numbers import Integral

from torch import nn

from .layer import ElasticLoRALinear

SearchSpace = dict[str, list[int]]
Config = dict[str, int]
_CACHE = "_shears_elastic_index"  # the model's __dict__ entry holding its index


def elastic_modules(model: nn.Module) -> Iterator[tuple[str, ElasticLoRALinear]]:
    """Yield ``(qualified_name, module)`` for every elastic adapter, in module order (a walk)."""
    for name, module in model.named_modules():
        if isinstance(module, ElasticLoRALinear):
            yield name, module


def group_of(name: str, module: ElasticLoRALinear) -> str:
    """The group key of an adapter: its ``group`` attribute, else its own qualified name."""
    return module.group if module.group is not None else name


def _as_int(rank: object, group: str) -> int:
    """numpy and Python ints become int; anything else (bool, float, str) is refused."""
    if type(rank) is int:  # the common case, without the slower abstract-class check
        return rank
    if isinstance(rank, bool) or not isinstance(rank, Integral):
        raise ValueError(f"group {group!r}: rank must be an int, got {rank!r}")
    return int(rank)


def validate_config(space: SearchSpace, config: Mapping[str, int]) -> Config:
    """Check a (possibly partial) configuration against a space; return it with plain ints.

    Raises ``TypeError`` for a ``config`` that is not a mapping (a list of ranks, a string),
    ``KeyError`` for an unknown group and ``ValueError`` for a rank outside its list.
    """
    if not isinstance(config, Mapping):
        example = {g: ranks[0] for g, ranks in list(space.items())[:1]}
        raise TypeError(f"a configuration is a mapping group -> rank (e.g. {example}), got "
                        f"{type(config).__name__} {config!r}")
    out: Config = {}
    for group, rank in config.items():
        if group not in space:
            raise KeyError(f"unknown adapter group {group!r}; known groups: {list(space)[:8]}...")
        r = _as_int(rank, group)
        if r not in space[group]:
            raise ValueError(f"rank {rank!r} of group {group!r} is not in {space[group]}")
        out[group] = r
    return out


class ElasticIndex:
    """Group -> elastic adapters of one model and its search space, from one walk.

    Attributes:
        space: group -> descending rank list, groups in module order (read it, do not
            mutate it; ``search_space(model)`` hands out copies).
        groups: group -> tuple of its ``ElasticLoRALinear`` modules, in module order.

    A switch (``set``) validates against ``space`` and calls the ``active_rank`` setter of
    the group's modules, so whatever that setter does (e.g. update a mask) still happens.
    An adapter's ``group`` and ``ranks`` are taken as fixed once it is attached.
    """

    def __init__(self, model: nn.Module) -> None:
        groups: dict[str, list[ElasticLoRALinear]] = {}
        names = []
        for name, module in elastic_modules(model):
            groups.setdefault(group_of(name, module), []).append(module)
            names.append(name)
        if not groups:
            raise ValueError(
                "the model carries no elastic LoRA adapters; call add_elastic_lora first")
        self.space: SearchSpace = {}
        for group, modules in groups.items():
            for m in modules:
                if group in self.space and self.space[group] != list(m.ranks):
                    raise ValueError(
                        f"group {group!r} mixes rank lists {self.space[group]} and {list(m.ranks)}"
                    )
                self.space[group] = list(m.ranks)
        self.groups = {g: tuple(ms) for g, ms in groups.items()}
        # Each module's ``active_rank`` setter, called directly: ``m.active_rank = r`` would
        # first pass through nn.Module.__setattr__ (about 2 us per module and switch).
        self._setters = {g: tuple((type(m).active_rank.fset, m) for m in ms)
                         for g, ms in groups.items()}
        self._edges = _edges(model, names)
        self._constructed = ElasticLoRALinear.constructed

    def __reduce__(self) -> tuple:
        """A pickle or deep copy of the model carries no index; it rebuilds on first use."""
        return (_no_index, ())

    def is_current(self, model: nn.Module) -> bool:
        """Does the index still describe ``model``? About 0.1 us per module on the paths.

        Every (parent, child name, child) link on the paths from ``model`` to the indexed
        adapters must be unchanged (so a merged, replaced, moved or deleted adapter or block
        is noticed, including ``del`` on a ``ModuleList``), and no ``ElasticLoRALinear`` may
        have been constructed since the walk (so an adapter attached elsewhere is noticed).
        """
        if ElasticLoRALinear.constructed != self._constructed:
            return False
        root = model._modules
        for parent, name, child in self._edges:
            if (root if parent is None else parent._modules).get(name) is not child:
                return False
        return True

    def get(self) -> Config:
        """The active configuration, read from the modules: group -> rank, in space order."""
        config: Config = {}
        for group, modules in self.groups.items():
            rank = modules[0].active_rank
            if len(modules) > 1 and any(m.active_rank != rank for m in modules):
                ranks = {m.active_rank for m in modules}
                raise ValueError(
                    f"adapters of group {group!r} disagree on the active rank: {ranks}")
            config[group] = rank
        return config

    def set(self, config: Mapping[str, int]) -> Config:
        """Activate a (possibly partial) configuration; return the complete active one.

        The whole config is validated before anything changes. Groups missing from
        ``config`` keep their rank. The result is in space order.
        """
        valid = validate_config(self.space, config)
        for group, rank in valid.items():
            for set_rank, m in self._setters[group]:
                set_rank(m, rank)  # the single place a switch touches a module: its setter
        if len(valid) == len(self.space):  # complete: nothing to read back
            return {g: valid[g] for g in self.space}
        return self.get()


def _no_index() -> None:
    return None


def _edges(model: nn.Module, names: list[str]) -> list[tuple[nn.Module | None, str, nn.Module]]:
    """The distinct (parent, child name, child) links from ``model`` down to ``names``.

    The root parent is stored as ``None`` and checked against the model passed in.
    """
    edges, seen = [], set()
    for name in names:
        parent: nn.Module = model
        for atom in name.split(".") if name else []:
            child = parent._modules[atom]
            if (id(parent), atom) not in seen:
                seen.add((id(parent), atom))
                edges.append((None if parent is model else parent, atom, child))
            parent = child
    return edges


def elastic_index(model: nn.Module) -> ElasticIndex:
    """The model's ``ElasticIndex``: cached on the model, rebuilt when no longer current.

    The cache lives in the model's ``__dict__``, so it dies with the model; a pickle or
    ``copy.deepcopy`` of the model carries none and builds its own on first use.
    Raises ``ValueError`` when the model carries no elastic adapters.
    """
    index = model.__dict__.get(_CACHE)
    if index is None or not index.is_current(model):
        model.__dict__.pop(_CACHE, None)  # a stale index never outlives a failed rebuild
        index = ElasticIndex(model)
        model.__dict__[_CACHE] = index
    return index
