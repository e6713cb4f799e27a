"""Models: the backbone registry and weights, cutting and pooling, new heads, custom layers."""
