"""Recipes: YAML in, validated and typed objects with every default filled in.

A recipe is a tree of dataclasses. One generic validator walks that tree using the type hints,
so the schema below is the single place that says which keys exist, their types, ranges and
defaults. Errors name the full key path, the value and what is expected, with a did-you-mean for
unknown keys. Relative paths resolve against the recipe file's folder.

Example:
    >>> recipe = load_recipe("recipes/digits.yaml")
    >>> recipe.backbone.name, recipe.extract.classifier.name
    ('mobilenet_v2', 'logistic_regression')
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from transferkit.data.augment import AUGMENTATIONS
from transferkit.errors import RecipeError
from transferkit.errors import did_you_mean as _did_you_mean

BUILTIN_PREFIX = "builtin:"

#: Upper bounds, checked when a recipe is loaded (before any slow work).
MAX_EPOCHS = 10_000
MAX_IMAGE_SIZE = 4096
MAX_BATCH_SIZE = 8192
MAX_DENSE_UNITS = 65_536
MAX_SEED = 2**32 - 1
#: A recipe file is a few KB; its YAML may hold at most this many values once aliases are expanded.
MAX_RECIPE_BYTES = 2**20
MAX_YAML_VALUES = 100_000

_EPOCHS_WHY = "a run that long never ends; split it into runs and --resume"


def _spec(default=dataclasses.MISSING, *, key=None, path=False, ge=None, gt=None, le=None, lt=None,
          doc="", why=""):
    """A schema field: its default, YAML key (when not the attribute name), range, path flag, and
    ``why``: the reason for its upper bound, added to range errors."""
    meta = {"key": key, "path": path, "ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc, "why": why}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------

@dataclass
class DataSpec:
    """Where the images are and how they are batched."""
    train: str = _spec(path=True, doc="class-per-folder images, or builtin:digits")
    val: Union[float, str, None] = _spec(0.2, path=True, gt=0, lt=1, doc="stratified fraction, a folder, or null")
    test: Union[float, str, None] = _spec(None, path=True, gt=0, lt=1, doc="stratified fraction, a folder, or null")
    image_size: Optional[int] = _spec(
        None, ge=8, le=MAX_IMAGE_SIZE, doc="square input size; null: the backbone's default",
        why=f"one {MAX_IMAGE_SIZE} px image is already 192 MiB as float32, and a batch of larger ones does not "
            "fit in memory")
    batch_size: int = _spec(32, ge=1, le=MAX_BATCH_SIZE,
                            why="a larger batch does not fit in memory")
    split_seed: Optional[int] = _spec(None, ge=0, le=MAX_SEED, why="seeds are 32-bit",
                                      doc="seed of the val/test split; null: the recipe's seed")
    follow_links: bool = _spec(False, doc="follow symbolic links that lead outside the data folder")
    cache: Union[bool, int, Literal["auto"]] = _spec(
        "auto", ge=0, doc="keep decoded images in memory while training: true, false, at most N images, or "
                          "auto: as many as fit in a quarter of the RAM")
    augment: list = _spec([], doc="Keras augmentation layers by name, e.g. [random_flip, {random_rotation: 0.1}]")
    augment_on: Literal["auto", "pipeline", "model"] = _spec(
        "auto", doc="where augmentation runs: pipeline (input pipeline, CPU), model (in the training step, "
                    "on the accelerator); auto: model on a GPU, else pipeline")


@dataclass
class BackboneSpec:
    """The pretrained network (see `transferkit backbones`)."""
    name: str = _spec("mobilenet_v2")
    weights: Optional[str] = _spec("imagenet", path=True, doc="imagenet, null (random), or a weights file")
    alpha: Optional[float] = _spec(None, gt=0, doc="width multiplier (MobileNet families)")
    options: dict = _spec({}, doc="extra constructor arguments, e.g. {drop_connect_rate: 0.2}")


@dataclass
class DenseSpec:
    """One fully connected layer of the new head."""
    dense: int = _spec(ge=1, le=MAX_DENSE_UNITS, doc="units", why="a wider layer does not fit in memory")
    activation: str = _spec("relu")
    dropout: float = _spec(0.0, ge=0, lt=1, doc="dropout after the layer")
    batch_norm: bool = _spec(False)


@dataclass
class HeadSpec:
    """The new classification head attached to the cut backbone."""
    pooling: Literal["avg", "max", "flatten"] = _spec("avg")
    layers: list[DenseSpec] = _spec([])
    dropout: float = _spec(0.0, ge=0, lt=1, doc="dropout before the output layer")
    l1: float = _spec(0.0, ge=0)
    l2: float = _spec(0.0, ge=0)
    custom: Optional[str] = _spec(None, doc="import path of a head function, e.g. mypkg.heads:my_head")


@dataclass
class OptimizerSpec:
    """Any keras.optimizers class by name (sgd, adam, adamw, rmsprop, ...)."""
    name: str = _spec("adam")
    learning_rate: float = _spec(1e-3, gt=0)
    momentum: Optional[float] = _spec(None, ge=0, lt=1)
    nesterov: bool = _spec(False)
    weight_decay: Optional[float] = _spec(None, ge=0)
    options: dict = _spec({}, doc="other constructor arguments")

    @classmethod
    def _from_scalar(cls, value):
        return {"name": value} if isinstance(value, str) else value


@dataclass
class ScheduleSpec:
    """Learning-rate schedule over epochs, after an optional linear warm-up."""
    name: Literal["constant", "step", "exponential", "cosine", "sgdr", "function"] = _spec("constant")
    warmup_epochs: int = _spec(0, ge=0, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    min_learning_rate: float = _spec(0.0, ge=0)
    step_epochs: int = _spec(3, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY, doc="step: epochs between drops")
    gamma: float = _spec(0.1, gt=0, le=1, doc="step/exponential: factor per drop / per epoch")
    restart_epochs: int = _spec(2, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY, doc="sgdr: length of the first cycle")
    restart_mult: float = _spec(2.0, ge=1, doc="sgdr: growth of each next cycle")
    function: Optional[str] = _spec(None, doc="function: import path of lr(epoch, lr) -> lr")

    @classmethod
    def _from_scalar(cls, value):
        return {"name": value} if isinstance(value, str) else value


@dataclass
class EarlyStoppingSpec:
    """Stop when a validation metric stops improving; restore the best weights."""
    monitor: str = _spec("val_loss")
    patience: int = _spec(3, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    min_delta: float = _spec(0.0, ge=0)
    restore_best_weights: bool = _spec(True)


@dataclass
class UnfreezeSpec:
    """Which part of the body fine-tuning trains: give one of from, top_blocks, fraction, all."""
    from_layer: Optional[str] = _spec(None, key="from", doc="layer name; null: the backbone's default")
    top_blocks: Optional[int] = _spec(None, ge=1)
    fraction: Optional[float] = _spec(None, gt=0, le=1)
    all: bool = _spec(False)
    train_batchnorm: bool = _spec(False, doc="also update BatchNorm statistics")

    @classmethod
    def _from_scalar(cls, value):
        return {"all": True} if value == "all" else value

    def mode(self) -> tuple[str, object]:
        """The one mode set, as ``(recipe key, value)``; ``("from", None)`` if none.

        Raises:
            RecipeError: more than one of from, top_blocks, fraction and all is set.
        """
        modes = {"from": self.from_layer, "top_blocks": self.top_blocks, "fraction": self.fraction,
                 "all": self.all or None}
        chosen = [(key, value) for key, value in modes.items() if value is not None]
        if len(chosen) > 1:
            raise RecipeError(f"finetune.unfreeze: give one of from, top_blocks, fraction, all; "
                              f"got {', '.join(key for key, _ in chosen)}")
        return chosen[0] if chosen else ("from", None)


@dataclass
class WarmupSpec:
    """Train the new head on the frozen body."""
    epochs: int = _spec(3, ge=0, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    optimizer: OptimizerSpec = _spec(OptimizerSpec("rmsprop", 1e-3))
    linear_probe: bool = _spec(False, doc="LP-FT: start the head from a logistic regression on cached features")


@dataclass
class FinetuneSpec:
    """Unfreeze part of the body and train on at a low learning rate."""
    unfreeze: UnfreezeSpec = _spec(UnfreezeSpec())
    epochs: int = _spec(10, ge=0, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    optimizer: OptimizerSpec = _spec(OptimizerSpec("sgd", 1e-3, momentum=0.9, nesterov=True))
    schedule: ScheduleSpec = _spec(ScheduleSpec("cosine"))
    layer_decay: Optional[float] = _spec(None, gt=0, le=1, doc="layer-wise learning-rate decay")
    label_smoothing: float = _spec(0.0, ge=0, lt=1)
    mixup: float = _spec(0.0, ge=0, doc="MixUp alpha; 0 turns it off")
    cutmix: float = _spec(0.0, ge=0, doc="CutMix alpha; 0 turns it off")
    early_stopping: Optional[EarlyStoppingSpec] = _spec(None)


@dataclass
class ImagSpec:
    """Alternate normal episodes with episodes on permuted ("imagined") labels."""
    normal_epochs: int = _spec(4, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    imag_epochs: int = _spec(1, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    mapping: Union[Literal["derangement", "swap"], dict] = _spec("derangement")
    train: Literal["head", "head_and_body"] = _spec("head_and_body")
    head: Optional[HeadSpec] = _spec(None, doc="the imag episodes' head; null: a fresh one like the normal head")


@dataclass
class ClassifierSpec:
    """A scikit-learn classifier, by short name or import path (sklearn.svm:SVC)."""
    name: str = _spec("logistic_regression")
    params: dict = _spec({})
    grid: Optional[dict] = _spec(None, doc="cross-validated search grid; null: the classifier's default, {}: none")
    class_weight: Union[Literal["balanced"], dict, None] = _spec(None)
    standardize: bool = _spec(True)

    @classmethod
    def _from_scalar(cls, value):
        return {"name": value} if isinstance(value, str) else value


@dataclass
class ExtractSpec:
    """Cut the backbone, cache features, fit a scikit-learn classifier."""
    layer: Union[str, list[str]] = _spec("top", doc="top, a layer name, or a list (concatenated)")
    pooling: Literal["avg", "max"] = _spec("avg")
    classifier: ClassifierSpec = _spec(ClassifierSpec())
    tta: bool = _spec(True, doc="average features over horizontal flips")
    power_norm: bool = _spec(True, doc="signed square root of each feature before the classifier")


@dataclass
class Recipe:
    """A whole training recipe."""
    data: DataSpec = _spec()
    name: Optional[str] = _spec(None, doc="default: the recipe file's name")
    seed: int = _spec(1337, ge=0, le=MAX_SEED, why="seeds are 32-bit")
    backbone: BackboneSpec = _spec(BackboneSpec())
    strategy: Literal["extract", "finetune", "imag"] = _spec("extract")
    head: HeadSpec = _spec(HeadSpec())
    warmup: WarmupSpec = _spec(WarmupSpec())
    finetune: FinetuneSpec = _spec(FinetuneSpec())
    imag: ImagSpec = _spec(ImagSpec())
    extract: ExtractSpec = _spec(ExtractSpec())
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = _spec(
        "auto", doc="auto: mixed_bfloat16 on a GPU, float32 on the CPU")
    jit_compile: Union[bool, Literal["auto"]] = _spec("auto", doc="XLA; auto: on a GPU and under JAX")
    distribute: Literal["none", "data_parallel"] = _spec("none", doc="data_parallel: every local GPU (or device)")
    output: Optional[str] = _spec(None, path=True, doc="run folder; default: runs/<name>")

    def to_dict(self) -> dict:
        """The recipe as plain YAML-ready data, under its YAML key names."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_recipe(source: str | Path | dict, *, overrides: list[str] = (), base_dir=None) -> Recipe:
    """Read, validate and complete a recipe.

    Everything that can be checked without importing Keras is checked here: keys, types, ranges
    and upper bounds (every number finite), the YAML itself (UTF-8, at most
    :data:`MAX_YAML_VALUES` values once aliases are expanded), one unfreeze mode, augmentation
    names. `transferkit.strategies.check_recipe` checks the rest (layer names against the
    backbone, import paths, optimizer and classifier names) before any slow work.

    Args:
        source: a YAML file, or an already parsed mapping.
        overrides: ``key.path=value`` strings applied on top (values parsed as YAML),
            e.g. ``["finetune.epochs=2", "data.batch_size=16"]``. An override that sets one
            unfreeze mode (``finetune.unfreeze.all=true``) replaces the recipe's other mode.
        base_dir: folder that relative paths resolve against; default: the recipe's folder
            (the current folder for a mapping).

    Returns:
        A :class:`Recipe` with every default filled in and every path absolute.

    Raises:
        RecipeError: one line naming the key, the value and what is expected.
    """
    where = "recipe"
    if isinstance(source, dict):
        raw, name = source, None
    else:
        path = Path(source)
        where = str(path)
        raw = parse_yaml(_read_text(path), where)
        name, base_dir = path.stem, base_dir or path.parent
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys (data:, backbone:, ...), got {_kind(raw)}")
    raw = _apply_overrides(dict(raw), overrides)
    try:
        recipe = _build(Recipe, raw, "", Path(base_dir or Path.cwd()).resolve())
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    if recipe.name is None:
        recipe.name = name or "run"
    if recipe.output is None:
        recipe.output = str(Path.cwd().resolve() / "runs" / recipe.name)
    _check_consistency(recipe, where)
    return recipe


def _read_text(path: Path) -> str:
    """The recipe file's text, or a one-line RecipeError (missing, unreadable, too big, not UTF-8)."""
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path} (check the path, or run `transferkit recommend --write {path.name}`)")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size:,} bytes is too big for a recipe (at most {MAX_RECIPE_BYTES:,}): "
                              "is it the right file?")
        data = path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}): "
                          "save the recipe as UTF-8") from None


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a document whose aliases expand to too many values.

    An alias is a reference, so ``a: &a [x, x]`` ``b: &b [*a, *a]`` ... (a "billion laughs") is small
    as text and as nodes, but explodes when the recipe is copied, compared or written out. The
    composed node graph is measured before anything is constructed: every node counts as often as it
    is reachable, each node's size computed once, so measuring is as fast as reading.
    """

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node


def _expanded_size(root) -> int:
    """How many values the YAML node graph holds with every alias expanded (iteratively: no recursion).

    Raises:
        RecipeError: more than :data:`MAX_YAML_VALUES`, or an alias inside its own anchor.
    """
    def children(node):
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [item for pair in node.value for item in pair]
        return []

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose children are being measured: the current path
    stack = [(root, False)]
    while stack:
        node, measured = stack.pop()
        if measured:
            open_nodes.discard(id(node))
            sizes[id(node)] = size = 1 + sum(sizes[id(child)] for child in children(node))
            if size > MAX_YAML_VALUES:
                raise RecipeError(f"YAML aliases (*name) expand to more than {MAX_YAML_VALUES:,} values near line "
                                  f"{node.start_mark.line + 1}: write the values out instead of nesting aliases")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise RecipeError(f"a YAML alias at line {node.start_mark.line + 1} refers to its own anchor: "
                              "a recipe holds no recursive values")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children(node) if id(child) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str, where: str, fix: str = ""):
    """Parse one YAML document safely (no Python objects, aliases bounded by :data:`MAX_YAML_VALUES`).

    Args:
        text: the YAML text.
        where: what it is (a file name, an override), to start error messages with.
        fix: how to write it right, added to syntax errors.

    Raises:
        RecipeError: one line saying what is wrong and where.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecipeError as error:
        raise RecipeError(f"{where}: {error}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{where}: not valid YAML{line}: {_one_line(error.problem or error.context)}{fix}") from None
    except yaml.YAMLError as error:  # e.g. a control character
        raise RecipeError(f"{where}: not valid YAML: {_one_line(error)}{fix}") from None
    except RecursionError:
        raise RecipeError(f"{where}: the YAML is nested too deeply to be a recipe") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise RecipeError(f"{where}: a value cannot be read: {_one_line(error)}") from None


def _one_line(text) -> str:
    return " ".join(str(text).split())


#: The keys of finetune.unfreeze that choose a mode: one may be given.
UNFREEZE_MODES = ("from", "top_blocks", "fraction", "all")


def _apply_overrides(raw: dict, overrides) -> dict:
    """``raw`` with ``key.path=value`` overrides applied (copies along each path; ``raw`` is untouched).

    An override that sets an unfreeze mode removes the recipe's other modes: overrides replace.
    """
    modes_set = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key.path=value, e.g. finetune.epochs=2")
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[leaf] = value = parse_yaml(text, f"override {item!r}: the value",
                                        fix=" (write a whole YAML value, e.g. [a, b], or quote text)")
        if parents == ["finetune", "unfreeze"] and leaf in UNFREEZE_MODES and value not in (None, False):
            modes_set.append(leaf)
    if len(set(modes_set)) > 1:
        raise RecipeError(f"overrides set finetune.unfreeze.{' and .'.join(dict.fromkeys(modes_set))}: "
                          f"give one of {', '.join(UNFREEZE_MODES)}")
    if modes_set:
        unfreeze = raw["finetune"]["unfreeze"]
        for mode in UNFREEZE_MODES:
            if mode != modes_set[0]:
                unfreeze.pop(mode, None)
    return raw


def _check_consistency(recipe: Recipe, where: str) -> None:
    """Rules that involve more than one key."""
    try:
        recipe.finetune.unfreeze.mode()
    except RecipeError as error:
        raise RecipeError(f"{where}: {error}") from None
    for i, spec in enumerate(recipe.data.augment):
        name = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else spec
        if not isinstance(name, str):
            raise RecipeError(f"{where}: data.augment[{i}]: expected a name or {{name: arguments}}, "
                              f"e.g. random_flip or {{random_rotation: 0.1}}, got {spec!r}")
        if name not in AUGMENTATIONS:
            raise RecipeError(f"{where}: data.augment[{i}]: unknown augmentation {name!r}"
                              f"{did_you_mean(name, AUGMENTATIONS)}")


# --------------------------------------------------------------------------------------------
# The validator: one walk over the type hints
# --------------------------------------------------------------------------------------------

def _build(cls, raw, path: str, base: Path):
    if hasattr(cls, "_from_scalar"):
        raw = cls._from_scalar(raw)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {_kind(raw)} {raw!r}")
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = did_you_mean(str(key), list(fields), prefix=f"{path}." if path else "")
            raise RecipeError(f"unknown key {_join(path, key)}{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, f in fields.items():
        if key in raw:
            values[f.name] = _coerce(raw[key], hints[f.name], _join(path, key), f.metadata, base)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing key {_join(path, key)}: {f.metadata.get('doc') or 'required'}")
    return cls(**values)


def _coerce(value, hint, path, meta, base):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = {}
        for option in options:
            try:
                return _coerce(value, option, path, meta, base)
            except RecipeError as e:
                errors[option] = e
        same_kind = [o for o in options if _same_kind(o, value)]
        if len(same_kind) == 1:  # e.g. a number out of range for "fraction or folder"
            raise errors[same_kind[0]]
        raise RecipeError(f"{path}: expected {' or '.join(_describe(o, meta) for o in options)}"
                          f"{' or null' if type(None) in args else ''}, got {_kind(value)} {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, base)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise RecipeError(f"{path}: expected one of {', '.join(map(str, args))}, got {value!r}"
                          f"{did_you_mean(str(value), [str(a) for a in args])}")
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {_kind(value)} {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{path}[{i}]", {}, base) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {_kind(value)} {value!r}")
        _check_finite(value, path)
        return dict(value)
    if hint is Any:
        _check_finite(value, path)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        return _check_range(_number(value, hint, path, meta), path, meta)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected {_describe(str, meta)}, got {_kind(value)} {value!r}")
        return _resolve_path(value, base) if meta.get("path") else value
    raise TypeError(f"schema type {hint!r} at {path} is not supported")  # a bug in the schema


def _number(value, kind, path, meta):
    given = value
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{path}: expected {_describe(kind, meta)}, got {_kind(value)} {value!r}")
    if not math.isfinite(value):  # .nan, .inf, and 1e400 (read as inf)
        raise RecipeError(f"{path}: expected a finite {_describe(kind, meta).removeprefix('a ')}, got {given}")
    if kind is int:
        if float(value) != int(value):
            raise RecipeError(f"{path}: expected a whole number, got {value!r}")
        return int(value)
    return float(value)


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt),
           "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _check_range(value, path, meta):
    for key, (_, within) in _BOUNDS.items():
        if meta.get(key) is not None and not within(value, meta[key]):
            why = f" ({meta['why']})" if meta.get("why") and key in ("le", "lt") else ""
            raise RecipeError(f"{path}: expected {_describe(type(value), meta)}, got {value!r}{why}")
    return value


def _check_finite(value, path: str) -> None:
    """Rejects NaN and infinity anywhere inside a free-form value (options, params, grids)."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise RecipeError(f"{where}: expected a finite number, got {item!r}")
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def _describe(hint, meta) -> str:
    if hint in (int, float):
        bounds = " and ".join(f"{sign} {meta[k]}" for k, (sign, _) in _BOUNDS.items() if meta.get(k) is not None)
        noun = "a whole number" if hint is int else "a number"
        return f"{noun} {bounds}" if bounds else noun
    if hint is str:
        return "a path" if meta.get("path") else "text"
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is list or hint is list:
        return "a list"
    if typing.get_origin(hint) is dict or hint is dict:
        return "a mapping"
    if hint is bool:
        return "true or false"
    return getattr(hint, "__name__", str(hint))


def _same_kind(hint, value) -> bool:
    """Whether ``value`` is the kind of thing ``hint`` describes (ignoring ranges and choices)."""
    origin = typing.get_origin(hint) or hint
    if isinstance(value, bool):
        return hint is bool
    if isinstance(value, (int, float)):
        return hint in (int, float)
    if isinstance(value, str):
        return hint is str or origin is Literal
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(hint)
    return origin is list


def _resolve_path(value: str, base: Path) -> str:
    if value.startswith(BUILTIN_PREFIX) or value == "imagenet":
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _yaml_key(f) -> str:
    return f.metadata.get("key") or f.name


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """``": did you mean X?"`` (:func:`transferkit.errors.did_you_mean`, the choice shown after
    ``prefix``) for the closest choice, else ``" (valid: a, b, ...)"``: a tail for a recipe error."""
    choices = list(choices)
    hint = _did_you_mean(name, choices, show=lambda choice: f"{prefix}{choice}")
    return f": {hint}" if hint else f" (valid: {', '.join(sorted(choices))})"


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {_yaml_key(f): _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def recipe_splits(recipe: Recipe, screen: bool = True):
    """The recipe's train/val/test images, split with ``data.split_seed`` (default: the recipe's seed).
    ``screen=False`` only lists the folders (see :func:`transferkit.data.splits.load_splits`)."""
    from transferkit.data.splits import load_splits

    data = recipe.data
    return load_splits(data.train, data.val, data.test,
                       seed=recipe.seed if data.split_seed is None else data.split_seed,
                       follow_links=data.follow_links, screen=screen)


def import_object(path: str, key: str, expected: str, *, arguments: int | None = None):
    """The callable named by a recipe's import path ``package.module:name`` (or dotted).

    Args:
        path: the import path.
        key: the recipe key it came from, for the error message.
        expected: what it should be, e.g. "a function fn(epoch, lr) -> lr".
        arguments: how many positional arguments it will be called with, checked against its
            signature (None: not checked).

    Raises:
        RecipeError: the module or name cannot be imported, is not callable, or does not take
            ``arguments`` positional arguments.
    """
    module_name, colon, attribute = str(path).partition(":")
    if not colon:
        module_name, _, attribute = module_name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except Exception as error:  # noqa: BLE001 - a broken user module is reported in one line too
        raise RecipeError(f"{key}: cannot import {path!r} ({type(error).__name__}: {_one_line(error)}): "
                          f"give package.module:name of {expected}, on the Python path") from None
    if not callable(found):
        raise RecipeError(f"{key}: {path!r} is a {type(found).__name__}, not {expected}")
    if arguments is not None:
        check_arguments(found, arguments, key, expected, shown=repr(path))
    return found


def check_arguments(function, arguments: int, key: str, expected: str, shown: str | None = None) -> None:
    """Checks that ``function`` can be called with ``arguments`` positional arguments, without calling it.

    A callable whose signature Python cannot read (some built-ins) passes.

    Raises:
        RecipeError: it cannot, naming its signature and what is expected.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*[None] * arguments)
    except TypeError:
        name = shown or getattr(function, "__qualname__", None) or repr(function)
        raise RecipeError(f"{key}: {name} takes {signature}, not {arguments} positional arguments: "
                          f"expected {expected}") from None
