"""Build reward callables from a recipe's list of reward specs.

A recipe lists rewards like::

    rewards:
      - format                                   # a short name, default kwargs, weight 1
      - {name: degradation, weight: 1.0, kwargs: {graded: true}}
      - {name: rewards/my_reward.py:MyReward, weight: 0.5}   # a class or function in a file
      - {name: my_pkg.my_module:my_reward}                   # an importable class or function

``load_rewards`` returns the callables (each wrapped by ``guard_reward``) and their weights, ready for TRL's
``GRPOTrainer(reward_funcs=...)`` and ``GRPOConfig(reward_weights=...)``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .degradation import DegradationReward
from .fidelity import FidelityReward
from .format import FormatReward
from .generation import GenerationReward
from .guard import GuardedReward, guard_reward
from .understanding import UnderstandingReward

#: Short names usable in recipes.
REWARDS: dict[str, type] = {
    "format": FormatReward,
    "degradation": DegradationReward,
    "understanding": UnderstandingReward,
    "generation": GenerationReward,
    "fidelity": FidelityReward,
}


@dataclass
class RewardSpec:
    """One reward of a recipe.

    Attributes:
        name: a short name from ``REWARDS``, a file path and attribute (``rewards/my_reward.py:MyReward``, relative
            to the current directory or absolute), or an import path (``my_pkg.mod:fn``).
        kwargs: constructor kwargs of a class, or extra keyword arguments bound to a function.
        weight: the reward's weight in the sum TRL forms (``GRPOConfig.reward_weights``).
        label: name in the logs and errors; default: the reward's ``__name__`` (the short name for built-ins). Two
            rewards with the same name get ``_2``, ``_3``, ... appended.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    label: str | None = None

    @classmethod
    def from_recipe(cls, entry) -> RewardSpec:
        """A spec from a recipe entry: a plain string (the name) or a dict with the fields above."""
        if isinstance(entry, RewardSpec):
            return entry
        if isinstance(entry, str):
            return cls(name=entry)
        if not isinstance(entry, dict):
            raise TypeError(
                f"a reward spec must be a name or a dict with 'name', got {type(entry).__name__}: {entry!r}"
            )
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ValueError(f"reward spec {entry!r} has unknown keys {unknown}; allowed: {sorted(allowed)}")
        if "name" not in entry:
            raise ValueError(f"reward spec {entry!r} has no 'name'")
        return cls(**entry)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a reward spec's name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kwargs, Mapping) and self.kwargs is not None:
            raise ValueError(f"reward {self.name!r}: kwargs must be a dict, got {self.kwargs!r}")
        self.kwargs = dict(self.kwargs or {})
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"reward {self.name!r}: weight must be a finite number, got {weight!r}")
        self.weight = float(weight)


def resolve(name: str):
    """The class or function a spec name points to (see ``RewardSpec.name``)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown reward {name!r}.{hint} Available: {', '.join(REWARDS)}; or give a file "
            "('rewards/my_reward.py:MyReward') or an import path ('my_pkg.module:my_reward')."
        )
    location, attribute = name.rsplit(":", 1)
    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _import_file(Path(location))
        where = f"file {module.__file__}"
    else:
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(f"reward {name!r}: cannot import module {location!r} ({err})") from err
        where = f"module {location!r}"
    if not attribute or not hasattr(module, attribute):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise AttributeError(f"reward {name!r}: {where} has no attribute {attribute!r}; it defines {defined}")
    return getattr(module, attribute)


def _import_file(path: Path):
    """Import a Python file as a module (once per file), so rewards can live outside any package."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward file not found: {path} (relative paths are relative to {Path.cwd()})")
    # A unique, stable module name per file, registered in sys.modules so dataclasses and pickling work.
    module_name = f"vlcot_user_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def build_reward(spec: RewardSpec):
    """Instantiate a class with ``spec.kwargs``, or bind them to a function; returns the (unguarded) callable."""
    target = resolve(spec.name)
    if isinstance(target, type):
        try:
            return target(**spec.kwargs)
        except TypeError as err:
            raise TypeError(
                f"reward {spec.name!r}: bad kwargs {sorted(spec.kwargs)} for {target.__name__}: {err}"
            ) from err
    if not callable(target):
        raise TypeError(f"reward {spec.name!r} is a {type(target).__name__}, not a class or a function")
    if not spec.kwargs:
        return target
    bound = functools.partial(target, **spec.kwargs)
    bound.__name__ = getattr(target, "__name__", type(target).__name__)  # TRL and our logs name rewards by it
    return bound


def recipe_specs(entries, reward_kwargs=None, reward_weights=None) -> list[dict]:
    """A training recipe's ``rewards`` (names, or in YAML mappings in ``RewardSpec``'s form), its ``reward_kwargs``
    (per name, a dict or its JSON text) and ``reward_weights`` as one spec dict per reward, for ``load_rewards`` and
    for the run's saved settings. An entry's own kwargs win over ``reward_kwargs``; weights go in one place."""
    import json

    by_name = json.loads(reward_kwargs) if isinstance(reward_kwargs, str) else dict(reward_kwargs or {})
    entries = [dict(e) if isinstance(e, Mapping) else {"name": e} for e in entries or []]
    names = [str(e.get("name")) for e in entries]
    unknown = set(by_name) - set(names)
    if unknown:
        raise ValueError(f"reward_kwargs names rewards that are not in `rewards`: {sorted(unknown)}")
    weighted = [n for n, e in zip(names, entries) if "weight" in e]
    if weighted and reward_weights:
        raise ValueError(
            f"rewards {weighted} carry a weight and reward_weights is set too: give the weights in one place"
        )
    weights = list(reward_weights or [e.get("weight", 1.0) for e in entries])
    if len(weights) != len(entries):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(entries)} rewards")
    return [
        {**e, "kwargs": _merged_kwargs(by_name.get(n), e.get("kwargs")), "weight": w}
        for n, e, w in zip(names, entries, weights)
    ]


def _merged_kwargs(from_reward_kwargs, from_entry):
    """An entry's own kwargs over those ``reward_kwargs`` gives its name; anything but a mapping is left for
    ``RewardSpec`` to reject with its message."""
    if from_entry is not None and not isinstance(from_entry, Mapping):
        return from_entry
    return {**(from_reward_kwargs or {}), **(from_entry or {})}


def load_rewards(specs) -> tuple[list[GuardedReward], list[float]]:
    """Reward callables (each guarded, see ``guard_reward``) and their weights, from a recipe's list of specs."""
    rewards: list[GuardedReward] = []
    weights: list[float] = []
    taken: set[str] = set()
    for entry in specs:
        spec = RewardSpec.from_recipe(entry)
        reward = build_reward(spec)
        label = spec.label or getattr(reward, "__name__", None) or type(reward).__name__
        unique, k = label, 2
        while unique in taken:  # TRL logs rewards by name: two "fidelity" terms must not share one
            unique, k = f"{label}_{k}", k + 1
        taken.add(unique)
        rewards.append(guard_reward(reward, unique))
        weights.append(spec.weight)
    return rewards, weights
