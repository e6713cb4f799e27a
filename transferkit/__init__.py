"""transferkit: the best classifier a pretrained ImageNet backbone can give, without boilerplate.

Example:
    >>> import transferkit as tk
    >>> run = tk.extract(tk.load_recipe("recipes/digits.yaml"))
    >>> run.metrics["val"]["top1"]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any TensorFlow import

from transferkit.version import __version__  # noqa: E402,F401
from transferkit.errors import BackboneError, DataError, RecipeError, ResourceError, TransferkitError  # noqa: E402
from transferkit.recipe import Recipe, load_recipe  # noqa: E402
from transferkit.recommend import Recommendation, recommend  # noqa: E402

_LAZY = {  # imported on first use: these pull in Keras / TensorFlow
    "create_backbone": "transferkit.models.backbones", "list_backbones": "transferkit.models.registry",
    "load_splits": "transferkit.data.splits", "make_dataset": "transferkit.data.pipelines", "scan_folder": "transferkit.data.folders",
    "extract": "transferkit.strategies.extract", "finetune": "transferkit.strategies.finetune",
    "attach_head": "transferkit.models.heads", "compare": "transferkit.strategies.compare", "unfreeze": "transferkit.models.surgery", "Run": "transferkit.run", "cut": "transferkit.models.surgery",
    "FeatureExtractor": "transferkit.features.transformer", "export_model": "transferkit.export",
    "tune": "transferkit.strategies.tune", "lr_find": "transferkit.strategies.lr_find",
    "recommend_by_search": "transferkit.recommend_search",
    "write_html_report": "transferkit.reports.html",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")


__all__ = ["BackboneError", "DataError", "RecipeError", "ResourceError", "Recipe", "Recommendation", "TransferkitError",
           "load_recipe", "recommend", *_LAZY]
