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
