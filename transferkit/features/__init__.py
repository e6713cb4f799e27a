"""Features: the HDF5 feature store, scikit-learn classifiers and their safe files, the scikit-learn
transformer, and the measures of a dataset (best layer, LogME, ImageNet confidence)."""
