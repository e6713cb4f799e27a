"""Data: find, screen and split class-per-folder images; decode them; batch and augment them for Keras."""
