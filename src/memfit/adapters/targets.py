"""Which modules an adapter goes on: name matching, the model's own default targets, and modules_to_save.

Defaults come from the model, never from a table of ours: PEFT's mapping where it knows the model type, else
the query and value projections found by structure (the Linear children of attention modules named like q/query
and v/value, or one fused qkv projection), so a new architecture works without an edit here.
"""

from __future__ import annotations

import re

from torch import nn

from memfit.adapters.config import AdapterConfig
from memfit.adapters.layer import AdapterLayer
from memfit.adapters.method import Target
from memfit.errors import ConfigError, TargetNotFoundError

# Output heads are never adapted by "all-linear": they are trained fully via modules_to_save instead.
HEAD_NAMES = ("lm_head", "classifier", "score", "cls", "pooler", "qa_outputs")
_QUERY = re.compile(r"(^|_)(q|query)(_|$)")
_VALUE = re.compile(r"(^|_)(v|value)(_|$)")
_FUSED = re.compile(r"qkv|query_key_value|in_proj")
_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)


def name_matches(name: str, targets: list[str] | str) -> bool:
    """`targets` is a list of names matched as a path suffix, or a regex matched against the full path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(module_matches(name, t) for t in targets)


def module_matches(name: str, wanted: str) -> bool:
    """The one rule for naming a module: its dotted path, or a suffix of it at a dot ('classifier')."""
    return name == wanted or name.endswith("." + wanted)


def inside(name: str, modules: list[str]) -> bool:
    """Whether module `name` is one of `modules` or lies within one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def saved_modules(model: nn.Module, wanted: list[str]) -> list[str]:
    """The paths of the modules `wanted` names (see `module_matches`); an entry that names none is an error."""
    found: list[str] = []
    for entry in wanted:
        hits = [n for n, _ in model.named_modules() if n and module_matches(n, entry)]
        if not hits:
            top = sorted(n for n, _ in model.named_children())
            raise TargetNotFoundError(f"modules_to_save entry {entry!r} matches no module; top-level modules: {top}.")
        found += [h for h in hits if h not in found]
    return [n for n in found if not inside(n, [m for m in found if m != n])]  # outermost only


def default_targets(model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> list[str]:
    """The attention query and value projections of `model` (kinds, i.e. last path components)."""
    kinds = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, types)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    known = [k for k in PEFT_DEFAULTS.get(model_type, []) if k in kinds]
    if known:
        return known
    query, value, fused = set(), set(), set()
    for _, module in model.named_modules():
        if not _ATTENTION.search(type(module).__name__):
            continue
        for child_name, child in module.named_children():
            if isinstance(child, types):
                for pattern, group in ((_QUERY, query), (_VALUE, value), (_FUSED, fused)):
                    if pattern.search(child_name):
                        group.add(child_name)
    found = sorted(query | value) or sorted(fused)
    if not found:
        raise ConfigError(f"found no attention query/value projections in this {type(model).__name__} (model type "
                          f"{model_type!r}) to adapt by default; pass target_modules (--targets): names such as "
                          f"{sorted(kinds)[:6]}, a regex, or 'all-linear'.")
    return found


def target_spec(model: nn.Module, config: AdapterConfig, types: tuple[type[nn.Module], ...]) -> list[str] | str:
    if config.target_modules is not None:
        return config.target_modules
    spec = config.default_targets(model)
    return spec if spec is not None else default_targets(model, types)


def find_targets(model: nn.Module, config: AdapterConfig, types: tuple[type[nn.Module], ...]) -> list[Target]:
    """Modules of `types` whose path matches the config (outside modules_to_save), with their kind and layer."""
    spec = target_spec(model, config, types)
    saved = saved_modules(model, config.modules_to_save)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, types) or isinstance(module, AdapterLayer) or inside(name, saved):
            continue
        if spec == "all-linear":
            if name.rpartition(".")[2] not in HEAD_NAMES:
                chosen.append((name, module))
        elif name_matches(name, spec):
            chosen.append((name, module))
    if not chosen:
        existing = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, types)})
        raise TargetNotFoundError(f"target_modules={spec!r} matched no {'/'.join(t.__name__ for t in types)} module. "
                                  f"Module names that exist: {existing}.")
    counts: dict[str, int] = {}
    for name, _ in chosen:
        kind = name.rpartition(".")[2]
        counts[kind] = counts.get(kind, 0) + 1
    seen: dict[str, int] = {}
    targets = []
    for name, module in chosen:
        kind = name.rpartition(".")[2]
        targets.append(Target(name, module, kind, seen.get(kind, 0), counts[kind]))
        seen[kind] = seen.get(kind, 0) + 1
    return targets
