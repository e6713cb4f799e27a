"""Data: find, screen and split class-per-folder images or the images a labels CSV lists; decode them; batch and
augment them for Keras."""
