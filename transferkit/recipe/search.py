"""The ``tune:`` section: a time budget and a search space over any recipe key, checked at load.

Each entry of ``tune.space`` names a recipe key (dotted, as ``--set`` writes it) and the values a
trial may give it: a list of choices, or a range::

    tune:
      budget: 25m
      space:
        strategy: [extract, finetune]
        extract.layer: [block_13_add, block_15_add, top]
        finetune.optimizer.learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}
        finetune.epochs: {low: 4, high: 12}                 # integers: an integer range
        finetune.unfreeze.fraction: {low: 0.2, high: 1.0, step: 0.1}

Every choice and both ends of every range must be a value the key accepts: each is tried on the
recipe (as ``--set`` would set it) when the recipe loads, so `transferkit validate` rejects a bad
space with one line before anything runs.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import yaml

from transferkit.errors import RecipeError
from transferkit.recipe.messages import did_you_mean, kind_of
from transferkit.recipe.reading import set_keys

#: Keys a search may not change: the split must stay fixed so that trials compare, and the run's
#: name, folder and the search's own settings are not plans.
FIXED_KEYS = ("data.train", "data.val", "data.test", "data.split_seed", "name", "output", "tune")
_RANGE_KEYS = ("low", "high", "log", "step")
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


@dataclass(frozen=True)
class Parameter:
    """One searched recipe key: ``choices``, or a range ``low``..``high`` (``log`` scale, ``step``).

    A range of two integers (and an integer step) is an integer range; any other range is a float range.
    ``strategies``: the strategies whose trials sample it; () for those whose recipe sections hold the key.
    """
    key: str
    choices: tuple | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    strategies: tuple = ()

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high)) and \
            (self.step is None or isinstance(self.step, int))

    def values(self) -> list:
        """The values that stand for the whole parameter when it is checked: the choices, or both ends."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def contains(self, value) -> bool:
        """Whether ``value`` is one of this parameter's values (a choice, or inside the range)."""
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def to_dict(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, **({"step": self.step} if self.step else {})}

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(label, self.choices))
        return f"{self.low:g}..{self.high:g}" + (" (log)" if self.log else "") + \
            (f" step {self.step:g}" if self.step else "")


def label(value) -> str:
    """A choice as text: scalars as they are, lists and mappings in YAML's flow style."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value) if not isinstance(value, str) else value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def parse_parameter(key: str, spec) -> Parameter:
    """A :class:`Parameter` from a ``tune.space`` entry: a list of choices, ``{choices: [...]}`` or
    ``{low, high, log, step}``.

    Raises:
        RecipeError: an empty list, an unknown key, a bound that is not a number, low >= high, a log
            range that reaches 0, a step that is not positive.
    """
    where = f"tune.space.{key}"
    if isinstance(spec, dict) and set(spec) == {"choices"}:
        spec = spec["choices"]
    if isinstance(spec, list):
        if not spec:
            raise RecipeError("expected at least one choice, got an empty list", key=where)
        return Parameter(key, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise RecipeError(f"expected a list of choices or {{low: A, high: B}}, got {kind_of(spec)} {spec!r}", key=where)
    for name in spec:
        if name not in _RANGE_KEYS:
            raise RecipeError(f"unknown key {name!r}{did_you_mean(str(name), ('choices', *_RANGE_KEYS))}", key=where)
    for name in ("low", "high") + (("step",) if spec.get("step") is not None else ()):
        value = spec.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"{name}: expected a finite number, got {kind_of(value)} {value!r}", key=where)
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise RecipeError(f"log: expected true or false, got {log!r}", key=where)
    if low >= high:
        raise RecipeError(f"an empty range: low {low} must be below high {high}", key=where)
    if log and low <= 0:
        raise RecipeError(f"a log range needs low > 0, got {low}", key=where)
    if step is not None and (step <= 0 or log):
        raise RecipeError("step: expected a number > 0, and no step on a log range", key=where)
    return Parameter(key, low=low, high=high, log=log, step=step)


def parse_space(space: dict) -> dict[str, Parameter]:
    """Every entry of ``tune.space`` parsed (see :func:`parse_parameter`), fixed keys refused."""
    parameters = {}
    for key, spec in space.items():
        if not isinstance(key, str) or not key:
            raise RecipeError(f"expected recipe keys such as finetune.epochs, got {key!r}", key="tune.space")
        fixed = next((k for k in FIXED_KEYS if key == k or key.startswith(k + ".")), None)
        if fixed is not None:
            raise RecipeError(f"{fixed} is not searched: the validation split stays fixed across trials so that they "
                              "compare, and the run's name, folder and the search's settings are not plans",
                              key=f"tune.space.{key}")
        parameters[key] = parse_parameter(key, spec)
    return parameters


def check_space(raw: dict, build) -> dict[str, Parameter]:
    """Parse ``raw["tune"]["space"]`` and try each of its values on the recipe ``raw``.

    Args:
        raw: the recipe as plain data (after ``--set`` overrides).
        build: ``build(raw) -> Recipe``: validates a whole recipe (raises RecipeError).

    Raises:
        RecipeError: a bad entry, or a value the key does not accept (named, with why).
    """
    tune = raw.get("tune") if isinstance(raw.get("tune"), dict) else {}
    space = tune.get("space") or {}
    if not isinstance(space, dict):
        return {}  # the schema walk reports its type
    parameters = parse_space(space)
    for key, parameter in parameters.items():
        for value in parameter.values():
            try:
                build(with_values(raw, {key: value}))
            except RecipeError as error:
                raise RecipeError(f"the value {label(value)!r} does not fit the recipe: {error}",
                                  key=f"tune.space.{key}") from None
    return parameters


def with_values(raw: dict, values: dict) -> dict:
    """A deep copy of the plain recipe ``raw`` with dotted ``key: value`` pairs set (as ``--set`` does)."""
    return set_keys(copy.deepcopy(raw), values)


def parse_duration(text, key: str = "tune.budget") -> float:
    """Seconds from ``90s``, ``25m``, ``2h``, ``1h30m`` or a number of seconds.

    Raises:
        RecipeError: anything else, or no time at all.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text)) if isinstance(text, str) and text.strip() else None
        if match is None or not any(match.groups()):
            raise RecipeError(f"expected a duration such as 90s, 25m, 2h or 1h30m, got {text!r}", key=key)
        hours, minutes, secs = (float(g or 0) for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not math.isfinite(seconds) or seconds <= 0:
        raise RecipeError(f"expected a duration above zero, got {text!r}", key=key)
    return seconds
