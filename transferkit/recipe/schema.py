"""The recipe schema: which keys exist, their types, ranges and defaults, in one place.

A recipe is a tree of the dataclasses below. Each field is made by :func:`_spec`, whose metadata
(YAML key, bounds, path flag, the reason for an upper bound) the validator in
:mod:`transferkit.recipe.validation` reads together with the type hints.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from transferkit.data.sources import BUILTIN_PREFIX  # noqa: F401 (part of the schema: a data source that is not a path)
from transferkit.errors import RecipeError

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


class _GivenByName:
    """A spec that a bare name may stand for: ``optimizer: adam`` means ``optimizer: {name: adam}``."""

    @classmethod
    def from_scalar(cls, value):
        """The mapping a bare value given for this section stands for (other values pass unchanged)."""
        return {"name": value} if isinstance(value, str) else value


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------

@dataclass
class DataSpec:
    """Where the images are and how they are batched."""
    train: str = _spec(path=True, doc="class-per-folder images, a labels CSV (path,label[,split]), or builtin:digits")
    val: Union[float, str, None] = _spec(0.2, path=True, gt=0, lt=1,
                                         doc="stratified fraction, a folder or labels CSV, or null (leave it out "
                                             "when data.train's CSV has a split column)")
    test: Union[float, str, None] = _spec(None, path=True, gt=0, lt=1,
                                          doc="stratified fraction, a folder or labels CSV, or null")
    image_size: Optional[int] = _spec(
        None, ge=8, le=MAX_IMAGE_SIZE, doc="square input size; null: the backbone's default",
        why=f"one {MAX_IMAGE_SIZE} px image is already 192 MiB as float32, and a batch of larger ones does not "
            "fit in memory")
    batch_size: int = _spec(32, ge=1, le=MAX_BATCH_SIZE,
                            why="a larger batch does not fit in memory")
    split_seed: Optional[int] = _spec(None, ge=0, le=MAX_SEED, why="seeds are 32-bit",
                                      doc="seed of the val/test split; null: the recipe's seed")
    follow_links: bool = _spec(False, doc="use files that lie outside the data folder (or the labels CSV's folder) "
                                         "through a symbolic link, .. or an absolute path")
    cache: Union[bool, int, Literal["auto"]] = _spec(
        "auto", ge=0, doc="keep decoded images in memory while training: true, false, at most N images, or "
                          "auto: as many as fit in a quarter of the RAM")
    augment: list = _spec([], doc="Keras augmentation layers by name, e.g. [random_flip, {random_rotation: 0.1}]")
    augment_on: Literal["auto", "pipeline", "model"] = _spec(
        "auto", doc="where augmentation runs: pipeline (input pipeline, CPU), model (in the training step, "
                    "on the accelerator); auto: model on a GPU, else pipeline")
    class_weight: Union[Literal["balanced"], dict, None] = _spec(
        None, doc="weigh the classes in fine-tuning's loss and in extract's classifier: balanced (n_images / "
                  "(n_classes * the class's images), counted on the training split) or {class name: weight}")
    sampling: Literal["shuffle", "balanced"] = _spec(
        "shuffle", doc="how fine-tuning draws each epoch's training images: shuffle (each once) or balanced (as many "
                       "draws, with replacement, each class equally likely); fits on features (extract's classifier, "
                       "the linear probe) take balanced class weights instead, what it gives in expectation")


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
class OptimizerSpec(_GivenByName):
    """Any keras.optimizers class by name (sgd, adam, adamw, rmsprop, ...)."""
    name: str = _spec("adam")
    learning_rate: float = _spec(1e-3, gt=0)
    momentum: Optional[float] = _spec(None, ge=0, lt=1)
    nesterov: bool = _spec(False)
    weight_decay: Optional[float] = _spec(None, ge=0)
    options: dict = _spec({}, doc="other constructor arguments")


@dataclass
class ScheduleSpec(_GivenByName):
    """Learning-rate schedule over epochs, after an optional linear warm-up."""
    name: Literal["constant", "step", "exponential", "cosine", "sgdr", "one_cycle", "plateau", "function"] = _spec(
        "constant")
    warmup_epochs: int = _spec(0, ge=0, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    min_learning_rate: float = _spec(0.0, ge=0)
    step_epochs: int = _spec(3, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY, doc="step: epochs between drops")
    gamma: float = _spec(0.1, gt=0, le=1, doc="step/exponential/plateau: factor per drop / per epoch / per plateau")
    restart_epochs: int = _spec(2, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY, doc="sgdr: length of the first cycle")
    restart_mult: float = _spec(2.0, ge=1, doc="sgdr: growth of each next cycle")
    pct_start: float = _spec(0.3, gt=0, lt=1, doc="one_cycle: fraction of the steps spent rising to learning_rate")
    div_factor: float = _spec(25.0, ge=1, doc="one_cycle: starts at learning_rate / div_factor")
    final_div_factor: float = _spec(1e4, ge=1, doc="one_cycle: ends at the starting rate / final_div_factor")
    monitor: str = _spec("val_loss", doc="plateau: the logged metric whose plateaus lower the rate")
    patience: int = _spec(2, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY,
                          doc="plateau: epochs without improvement before the rate drops")
    cooldown: int = _spec(0, ge=0, le=MAX_EPOCHS, why=_EPOCHS_WHY,
                          doc="plateau: epochs after a drop before waiting starts again")
    min_delta: float = _spec(0.0, ge=0, doc="plateau: the least change of monitor that counts as an improvement")
    function: Optional[str] = _spec(None, doc="function: import path of lr(epoch, lr) -> lr")


@dataclass
class EarlyStoppingSpec:
    """Stop when a validation metric stops improving; restore the best weights."""
    monitor: str = _spec("val_loss")
    patience: int = _spec(3, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    min_delta: float = _spec(0.0, ge=0)
    restore_best_weights: bool = _spec(True)


#: The keys of finetune.unfreeze that choose a mode: one may be given.
UNFREEZE_MODES = ("from", "top_blocks", "fraction", "all")


@dataclass
class UnfreezeSpec:
    """Which part of the body fine-tuning trains: give one of from, top_blocks, fraction, all."""
    from_layer: Optional[str] = _spec(None, key="from", doc="layer name; null: the backbone's default")
    top_blocks: Optional[int] = _spec(None, ge=1)
    fraction: Optional[float] = _spec(None, gt=0, le=1)
    all: bool = _spec(False)
    train_batchnorm: bool = _spec(False, doc="also update BatchNorm statistics")
    batchnorm_momentum: Optional[float] = _spec(
        None, gt=0, lt=1, doc="with train_batchnorm: the moving statistics' momentum (Keras' backbones use "
                              "0.99-0.999, which a short run never settles); null: the backbone's")

    @classmethod
    def from_scalar(cls, value):
        """``unfreeze: all`` means ``unfreeze: {all: true}``."""
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
    tta: Literal["none", "flip", "crops"] = _spec(
        "none", doc="test-time augmentation in the final model: flip (2 views) or crops (centre + 4 corners)")


@dataclass
class ImagSpec:
    """Alternate normal episodes with episodes on permuted ("imagined") labels."""
    normal_epochs: int = _spec(4, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    imag_epochs: int = _spec(1, ge=1, le=MAX_EPOCHS, why=_EPOCHS_WHY)
    mapping: Union[Literal["derangement", "swap"], dict] = _spec("derangement")
    train: Literal["head", "head_and_body"] = _spec("head_and_body")
    head: Optional[HeadSpec] = _spec(None, doc="the imag episodes' head; null: a fresh one like the normal head")


@dataclass
class ClassifierSpec(_GivenByName):
    """A scikit-learn classifier, by short name or import path (sklearn.svm:SVC)."""
    name: str = _spec("logistic_regression")
    params: dict = _spec({})
    grid: Optional[dict] = _spec(None, doc="cross-validated search grid; null: the classifier's default, {}: none")
    class_weight: Union[Literal["balanced"], dict, None] = _spec(
        None, doc="the older name of data.class_weight, still read (it moves there when the recipe is loaded)")
    standardize: bool = _spec(True)
    select_by: Literal["log_loss", "accuracy"] = _spec(
        "log_loss", doc="what the grid search picks by: cross-validated log-loss or accuracy (both are reported)")


@dataclass
class ExtractSpec:
    """Cut the backbone, cache features, fit a scikit-learn classifier."""
    layer: Union[str, list[str]] = _spec("top", doc="top, a layer name, or a list (concatenated)")
    pooling: Literal["avg", "max"] = _spec("avg")
    classifier: ClassifierSpec = _spec(ClassifierSpec())
    tta: bool = _spec(True, doc="average features over horizontal flips")
    power_norm: bool = _spec(True, doc="signed square root of each feature before the classifier")
    max_memory_features: Union[float, Literal["auto"]] = _spec(
        "auto", gt=0, doc="MiB of training features above which the classifier is sgd_streaming, fitted from disk "
                          "block by block; auto: a quarter of the RAM")


@dataclass
class TuneSpec:
    """The hyper-parameter search of `transferkit tune` (see :mod:`transferkit.recipe.search`)."""
    budget: Union[str, float] = _spec("30m", doc="wall-clock time for the whole search: 90s, 25m, 2h, 1h30m")
    trials: Optional[int] = _spec(None, ge=1, le=100_000, why="a study that long never ends",
                                  doc="at most this many trials; null: as many as the budget allows")
    metric: Literal["log_loss", "accuracy"] = _spec(
        "log_loss", doc="what picks the winner on the validation split: log-loss (lower) or top-1 (higher)")
    space: dict = _spec({}, doc="recipe key -> [choices] or {low, high, log, step}")
    defaults: bool = _spec(True, doc="also search the strategy's default space (space's keys replace its entries)")
    pruner: Literal["hyperband", "successive_halving", "median", "none"] = _spec(
        "hyperband", doc="stops weak fine-tuning trials early, by validation error per epoch")


@dataclass
class LogSpec:
    """Where a run's progress goes besides its run folder: TensorBoard event files, an MLflow tracking server."""
    tensorboard: bool = _spec(False, doc="write <run>/tensorboard/: loss, accuracy and learning rate per epoch and "
                                         "every tensorboard_steps steps, the confusion matrices, the recipe as "
                                         "hyper-parameters (pip install 'transferkit[tensorboard]')")
    tensorboard_steps: int = _spec(10, ge=1, le=1_000_000, why="a step count that large never logs a step",
                                   doc="training steps between the per-step TensorBoard scalars")
    mlflow: Optional[str] = _spec(None, doc="an MLflow tracking URI (sqlite:///mlflow.db, http://host:5000): the "
                                            "recipe as params, the metrics per epoch and at the end, the report "
                                            "files (pip install mlflow)")
    mlflow_experiment: str = _spec("transferkit", doc="the MLflow experiment the run goes to")


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
    tune: TuneSpec = _spec(TuneSpec())
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = _spec(
        "auto", doc="auto: mixed_bfloat16 on a GPU, float32 on the CPU")
    calibrate: Literal["temperature", "none"] = _spec(
        "temperature", doc="temperature: scale the probabilities by one temperature fitted on the val split")
    jit_compile: Union[bool, Literal["auto"]] = _spec("auto", doc="XLA; auto: on a GPU and under JAX")
    distribute: Literal["none", "data_parallel"] = _spec("none", doc="data_parallel: every local GPU (or device)")
    log: LogSpec = _spec(LogSpec(), doc="TensorBoard and MLflow logging")
    output: Optional[str] = _spec(None, path=True, doc="run folder; default: runs/<name>")

    def to_dict(self) -> dict:
        """The recipe as plain YAML-ready data, under its YAML key names."""
        return to_plain(self)

    def to_yaml(self) -> str:
        """The recipe as YAML text (:meth:`to_dict`), in schema order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def yaml_key(spec_field: dataclasses.Field) -> str:
    """The YAML key of a schema field: its ``key`` (``from``) when the attribute name differs."""
    return spec_field.metadata.get("key") or spec_field.name


def to_plain(value):
    """A spec (or a value inside one) as plain YAML-ready data, under the YAML key names."""
    if dataclasses.is_dataclass(value):
        return {yaml_key(f): to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
