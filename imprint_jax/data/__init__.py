"""Training data: reading what `imprint-jax prepare` wrote, and the input pipelines.

  schema        the pair record (fields, shapes, kinds)
  prepared      a prepared dataset folder, and the one way to open one (every reader)
  records       ArrayRecord files: atomic writing, corrupt records named, then stop or skip
  crops         crop geometry and image loading (shared by data preparation and compositing)
  augment       object perturbation (affine, colour, LUTs)
  masks         mask levels 1 (precise) .. 4 (box)
  views         view datasets: a fresh multi-view pair per visit
  pipeline      the grain pipelines of the two stages (DataConfig)
  feed          host batches -> global device arrays, prefetched, checkpointable
  token_store, latent_store   precomputed object tokens and VAE latents (`encode-*`)

Submodules are imported explicitly (`from imprint_jax.data import pipeline`) so that light
users (schema, augment, masks, crops) do not pull in grain or tensorflow-datasets. Nothing here
imports `imprint_jax.data_prep` (which writes prepared datasets) or names a mesh axis.
"""
