"""The transfer-learning decision table: dataset size x similarity to ImageNet -> a strategy.

|           | similar to ImageNet                    | different from ImageNet                      |
|-----------|----------------------------------------|----------------------------------------------|
| **small** | extract features at the top (pooled),  | extract features at an earlier layer,        |
|           | fit a linear classifier                | fit a linear classifier                      |
| **large** | warm up a new head, then fine-tune     | fine-tune most or all of the network from    |
|           | the top blocks                         | the pretrained start                         |

A dataset is *large* from ``LARGE_IMAGES_PER_CLASS`` images per class on (median over classes):
below that, fine-tuning millions of weights tends to over-fit where a linear classifier on
frozen features does not.

What `transferkit recommend` prints and writes is here too: :func:`format_recommendation`,
:func:`write_recipe` (a runnable recipe headed by the rationale) and :func:`rank_backbones_on`;
with a time budget, :mod:`transferkit.recommend_search` searches the answer against the other strategy.

Example:
    >>> rec = recommend(size="small", similar=True)
    >>> rec.strategy, rec.settings["extract"]["layer"]
    ('extract', 'top')
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from transferkit.errors import TransferkitError
from transferkit.io import atomic_write_text
from transferkit.models.registry import get_backbone_info
from transferkit.data.labels import has_split_column
from transferkit.data.sources import BUILTIN_PREFIX

LARGE_IMAGES_PER_CLASS = 1000
#: From this ratio of the largest class's images to the smallest's on, the recommendation says how to balance.
IMBALANCED = 2.0
PLACEHOLDER_DATA = "path/to/images"


@dataclass
class Recommendation:
    """What to do with a dataset, why, and the recipe settings that do it."""
    size: str                 # "small" | "large"
    similar: bool
    strategy: str             # "extract" | "finetune"
    summary: str
    rationale: list[str]
    settings: dict            # recipe sections: extract or head/warmup/finetune
    evidence: dict = field(default_factory=dict)   # what was given or measured
    measurement: dict | None = None                # transferkit.features.measure.Measurement.to_dict(), when measured
    backbone: str = "mobilenet_v2"                 # the backbone whose layer names the settings use
    alpha: float | None = None

    def recipe(self, data: str | None = None, backbone: str | None = None, name: str = "my-run",
               alpha: float | None = None) -> dict:
        """A complete, runnable recipe mapping (``data`` None leaves a placeholder to fill in).

        The backbone is the one the recommendation was made for; ``backbone`` and ``alpha``, when
        given, must be the same (the settings name its layers).

        Raises:
            TransferkitError: another backbone or alpha than the recommendation's.
        """
        backbone = get_backbone_info(backbone or self.backbone).name
        alpha = self.alpha if alpha is None else alpha
        if backbone != get_backbone_info(self.backbone).name or alpha != self.alpha:
            raise TransferkitError(f"this recommendation names layers of {self.backbone} (alpha {self.alpha}), not "
                                   f"{backbone} (alpha {alpha}): recommend again with backbone={backbone!r}")
        return {"name": name,
                "data": {"train": data or PLACEHOLDER_DATA, **({} if has_split_column(data) else {"val": 0.2}),
                         **({"augment": ["random_flip"]} if self.strategy == "finetune" else {})},
                "backbone": {"name": backbone, "weights": "imagenet", **({"alpha": alpha} if alpha else {})},
                "strategy": self.strategy,
                **self.settings}

    def to_dict(self) -> dict:
        return asdict(self)


def size_from_count(images_per_class: float) -> str:
    """``"large"`` from :data:`LARGE_IMAGES_PER_CLASS` images per class on, else ``"small"``."""
    return "large" if images_per_class >= LARGE_IMAGES_PER_CLASS else "small"


def count_images(data: str | Path) -> dict:
    """Images per class of a class-per-folder dataset or labels CSV (files counted, not decoded)."""
    from transferkit.data.splits import scan_source

    counts = list(scan_source(data, screen=False).class_counts().values())
    return {"classes": len(counts), "images": sum(counts), "min_per_class": min(counts),
            "median_per_class": statistics.median(counts), "max_per_class": max(counts),
            "imbalance": round(max(counts) / max(min(counts), 1), 2)}


def recommend(size: str | int | None = None, similar: bool | str | None = None, *,
              data: str | Path | None = None, backbone: str = "mobilenet_v2", alpha: float | None = None,
              seed: int = 0, progress: bool = True, measure_on=None) -> Recommendation:
    """Pick a strategy from the decision table, measuring what is not given.

    Args:
        size: ``"small"``, ``"large"``, or a number of images per class. ``None`` counts the
            images in ``data``.
        similar: whether the images look like ImageNet's photos (``True``/``"yes"``,
            ``False``/``"no"``). ``None`` with ``data`` measures it (`transferkit.features.measure`), and the
            measured best layer becomes the extract layer.
        data: a class-per-folder dataset or labels CSV, used to count images when ``size`` is not given
            (and measured without a labels CSV's test rows).
        backbone: the registry name whose layer names (cut point, where fine-tuning starts) the
            settings use.
        alpha: the backbone's width multiplier, for measuring.
        seed: seeds the measurement's subsample.
        progress: log what the measurement is doing (to stderr, unless logging is configured).
        measure_on: the images to measure similarity on (an ImageSet), instead of all of ``data``: its
            train and val splits, so that a held-out test split is not looked at.

    Returns:
        A :class:`Recommendation`; ``.recipe(data)`` turns it into a runnable recipe.
    """
    info = get_backbone_info(backbone)  # an unknown name fails before anything is counted or measured
    evidence = {}
    if size is None:
        if data is None:
            raise TransferkitError("say how big the dataset is: --size small|large|IMAGES_PER_CLASS, "
                                   "or point --data at the images to count them")
        evidence = count_images(data)
        size = size_from_count(evidence["median_per_class"])
        evidence["size_rule"] = (f"median {evidence['median_per_class']:g} images per class "
                                 f"{'>=' if size == 'large' else '<'} {LARGE_IMAGES_PER_CLASS}")
    size = _parse_size(size, evidence)
    measurement = None
    if similar is None and data is not None:
        from transferkit.data.splits import scan_source
        from transferkit.logs import log_to_stderr_unless_configured
        from transferkit.features.measure import measure

        if progress:
            log_to_stderr_unless_configured()
        images = measure_on if measure_on is not None else scan_source(data, screen=False, test_rows=False)
        measurement = measure(images, info.name, alpha, seed=seed)
        similar = measurement.similar
        evidence.update(_similarity_evidence(measurement))
    similar = _parse_similar(similar)
    cell = _TABLE[(size, similar)]
    settings = cell["settings"](info)
    rationale = list(cell["rationale"])
    if measurement is not None and cell["strategy"] == "extract":
        settings["extract"]["layer"] = measurement.recipe_layer
        rationale[-1] = f"The depth sweep measured {measurement.recipe_layer} as the best cut point."
    if evidence.get("imbalance", 0) >= IMBALANCED:
        rationale.append(f"The largest class has {evidence['imbalance']:g}x the images of the smallest: runs report "
                         "balanced accuracy and each class's recall; where every class matters as much, add "
                         "data.class_weight: balanced (or data.sampling: balanced), which trades some top-1 on "
                         "data this skewed for the small classes' recall.")
    return Recommendation(size=size, similar=similar, strategy=cell["strategy"], summary=cell["summary"],
                          rationale=rationale, settings=settings, evidence=evidence,
                          measurement=measurement.to_dict() if measurement else None,
                          backbone=info.name, alpha=alpha)


def _similarity_evidence(m) -> dict:
    """The measured signals as printable lines."""
    top, best = m.layers[-1], m.best_layer
    evidence = {"similarity": f"{'similar to' if m.similar else 'different from'} ImageNet, by the depth sweep "
                              f"on {m.images} images ({m.seconds['total']:.0f}s)",
                "depth_sweep": f"best {best} {m.probe[best]:.3f} vs top {m.probe[top]:.3f} "
                               f"(linear probe, {m.images} images, cross-validated)",
                "logme": f"best {max(m.logme, key=m.logme.get)} {max(m.logme.values()):.3f} vs top {m.logme[top]:.3f}"}
    if m.confidence:
        evidence["imagenet_confidence"] = (f"mean max-probability {m.confidence['mean_max_probability']:.3f}, "
                                           f"entropy {m.confidence['mean_entropy']:.3f} ({m.confidence['backbone']})")
    evidence["signals_saying_similar"] = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in m.signals.items())
    return evidence


def _parse_size(size, evidence: dict) -> str:
    if isinstance(size, str) and size.strip().isdigit():
        size = int(size)
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size < 1:
            raise TransferkitError(f"size: expected small, large or a number of images per class >= 1, got {size}")
        evidence.setdefault("images_per_class", size)
        evidence.setdefault("size_rule", f"{size:g} images per class "
                            f"{'>=' if size >= LARGE_IMAGES_PER_CLASS else '<'} {LARGE_IMAGES_PER_CLASS}")
        return size_from_count(size)
    if size in ("small", "large"):
        return size
    raise TransferkitError(f"size: expected small, large or a number of images per class, got {size!r}")


def _parse_similar(similar) -> bool:
    answers = {"yes": True, "true": True, "y": True, "no": False, "false": False, "n": False}
    if isinstance(similar, bool):
        return similar
    if isinstance(similar, str) and similar.lower() in answers:
        return answers[similar.lower()]
    if similar is None:
        raise TransferkitError("say whether the images look like ImageNet's photos: --similar yes|no")
    raise TransferkitError(f"similar: expected yes or no, got {similar!r}")


def format_recommendation(rec: Recommendation, ranking: list[dict] | None = None) -> str:
    """The recommendation as `transferkit recommend` prints it: the cell, the evidence, why, the settings
    and, when given, the backbones' ranking (:func:`rank_backbones_on`)."""
    lines = [f"{rec.size} dataset, {'similar to' if rec.similar else 'different from'} ImageNet "
             f"-> {rec.strategy}: {rec.summary}"]
    lines += [f"  {key}: {value}" for key, value in rec.evidence.items()]
    lines += ["why:", *(f"  - {line}" for line in rec.rationale)]
    lines += ["settings:", "  " + yaml.safe_dump(rec.settings, sort_keys=False).rstrip().replace("\n", "\n  ")]
    if ranking:
        lines.append("backbones (by LogME; probe accuracy at each one's best layer):")
        for row in ranking:
            name = row["backbone"] + (f":{row['alpha']}" if row["alpha"] else "")
            lines.append(f"  {name}: skipped ({row['skipped']})" if "skipped" in row else
                         f"  {row['rank_logme']}. {name}: LogME {row['logme']:.3f}, probe {row['probe']:.3f} "
                         f"(rank {row['rank_probe']}) at {row['best_layer']}, {row['seconds']:.0f}s")
    return "\n".join(lines)


def rank_backbones_on(data: str | Path, backbones: list[tuple[str, float | None]]) -> list[dict]:
    """Rank ``(name, alpha)`` backbones on a class-per-folder dataset by LogME and by the linear probe
    (:func:`transferkit.features.measure.rank_backbones`)."""
    from transferkit.data.splits import scan_source
    from transferkit.features.measure import rank_backbones

    return rank_backbones(scan_source(data, screen=False, test_rows=False), backbones)


def images_to_measure(data: str | None, overrides=()):
    """The images `recommend` measures when ``overrides`` (``KEY=VALUE``, checked here first) give a test
    split: the rest of ``data``, split as the written recipe splits it; None (all of ``data``) otherwise."""
    from transferkit.data.splits import load_splits
    from transferkit.recipe import load_recipe

    recipe = load_recipe({"data": {"train": recipe_data_path(data) or "."}}, overrides=overrides)
    if data is None or recipe.data.test is None:
        return None
    seed = recipe.seed if recipe.data.split_seed is None else recipe.data.split_seed
    return load_splits(recipe.data.train, None, recipe.data.test, seed=seed, follow_links=recipe.data.follow_links,
                       screen=False).train


def recipe_data_path(data: str | None) -> str | None:
    """``data`` as a written recipe holds it: an absolute folder, a ``builtin:`` source as it is, None
    (the placeholder to fill in) without data."""
    if data is None or data.startswith(BUILTIN_PREFIX):
        return data
    return str(Path(data).resolve())


def write_recipe(path: str | Path, recipe: dict, rec: Recommendation, placeholder: bool) -> None:
    """Write ``recipe`` (from :meth:`Recommendation.recipe`) as YAML headed by the recommendation's
    summary and rationale; ``placeholder``: mark the data.train placeholder to fill in."""
    header = [f"# transferkit recipe: {rec.summary}", *(f"# - {line}" for line in rec.rationale)]
    text = "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False)
    if placeholder:  # a YAML comment keeps the placeholder visible and the file loadable
        text = text.replace(f"train: {PLACEHOLDER_DATA}\n",
                            f"train: {PLACEHOLDER_DATA}  # FILL IN: one sub-folder per class\n")
    atomic_write_text(path, text)


def table_settings(size: str, similar: bool, backbone: str = "mobilenet_v2") -> dict:
    """The recipe settings of the table's ``(size, similar)`` cell, named for ``backbone``'s layers."""
    return _TABLE[(size, similar)]["settings"](get_backbone_info(backbone))


def command_for(strategy: str) -> str:
    """The `transferkit` command that runs a recipe of ``strategy``."""
    return "extract" if strategy == "extract" else "finetune"


def _linear_probe(layer: str) -> dict:
    return {"extract": {"layer": layer, "classifier": {"name": "logistic_regression"}}}


def _finetune(unfreeze, epochs: int, train_batchnorm: bool) -> dict:
    """LP-FT: the new head starts from a logistic regression on cached features (no warm-up epochs),
    then AdamW on a cosine schedule fine-tunes the unfrozen part."""
    return {
        "head": {"pooling": "avg", "dropout": 0.2},
        "warmup": {"linear_probe": True},
        "finetune": {"unfreeze": {**unfreeze, "train_batchnorm": train_batchnorm}, "epochs": epochs,
                     "optimizer": {"name": "adamw", "learning_rate": 3e-4, "weight_decay": 1e-4},
                     "schedule": {"name": "cosine", "warmup_epochs": 1},
                     "label_smoothing": 0.1, "early_stopping": {"monitor": "val_accuracy", "patience": 3}},
    }


_TABLE = {
    ("small", True): {
        "strategy": "extract",
        "summary": "feature extraction from the top (pooled) layer + a linear classifier",
        "rationale": [
            "Too few images to train millions of weights without over-fitting.",
            "The images look like ImageNet's, so the backbone's top features already describe them well.",
            "Features are extracted once and cached; a logistic regression fits in seconds.",
        ],
        "settings": lambda info: _linear_probe("top"),
    },
    ("small", False): {
        "strategy": "extract",
        "summary": "feature extraction from an earlier layer + a linear classifier",
        "rationale": [
            "Too few images to train millions of weights without over-fitting.",
            "The top layers specialise in ImageNet's classes; earlier layers hold more generic "
            "features (edges, textures, parts) that transfer better to images unlike ImageNet's.",
            "Try other cut points too: `transferkit backbones NAME` lists them.",
        ],
        "settings": lambda info: _linear_probe(info.mid_cut),
    },
    ("large", True): {
        "strategy": "finetune",
        "summary": "warm up a new head on the frozen body, then fine-tune the top blocks",
        "rationale": [
            "Enough images to adapt the top blocks without over-fitting.",
            "The images look like ImageNet's, so the lower layers stay frozen as they are.",
            "The new head starts from a linear probe on the frozen features (LP-FT), so no random gradients "
            "wreck the pretrained features.",
        ],
        "settings": lambda info: _finetune({"from": info.finetune_from}, epochs=10, train_batchnorm=False),
    },
    ("large", False): {
        "strategy": "finetune",
        "summary": "fine-tune most or all of the network from the pretrained start",
        "rationale": [
            "Enough images to retrain the whole network; the images differ from ImageNet's, "
            "so every layer has something to learn.",
            "Starting from ImageNet weights still converges faster than training from scratch.",
            "BatchNorm layers stay in inference mode: with Keras' slow moving averages, training them for a "
            "few epochs leaves validation running on stale statistics (train_batchnorm: true for long runs).",
        ],
        "settings": lambda info: _finetune({"all": True}, epochs=20, train_batchnorm=False),
    },
}
