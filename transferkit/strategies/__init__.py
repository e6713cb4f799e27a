"""The ways to train: each returns a transferkit.run.Run."""

from transferkit.backbones import check_weights, get_backbone_info
from transferkit.recipe import Recipe


def preflight(recipe: Recipe) -> int:
    """Check what can fail fast (backbone, alpha, size, weights file) before any slow work.

    Returns:
        The input image size: the recipe's, or the backbone's default.
    """
    spec = recipe.backbone
    image_size = recipe.data.image_size or get_backbone_info(spec.name).default_size
    check_weights(spec.name, spec.weights, image_size, spec.alpha, **spec.options)
    return image_size


def recipe_splits(recipe: Recipe):
    """The recipe's train/val/test images, split with ``data.split_seed`` (default: the recipe's seed)."""
    from transferkit.data import load_splits

    data = recipe.data
    return load_splits(data.train, data.val, data.test,
                       seed=recipe.seed if data.split_seed is None else data.split_seed)
