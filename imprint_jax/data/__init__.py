"""Training data: the pair-record schema, object augmentation, mask levels, grain pipelines.

Submodules are imported explicitly (`from imprint_jax.data import pipeline`) so that light
users (augment, masks) do not pull in grain or tensorflow-datasets.
"""
