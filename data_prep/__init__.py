"""`imprint-jax prepare`: published dataset layouts -> preprocessed pair shards.

  prepare    the driver (CLI flags, parallel resumable build, summary)
  shards     TFDS-compatible ArrayRecord writing and reading helpers
  crops      decoding, mask filters, object/target crops
  readers/   one reader per published layout
  synthetic  small synthetic datasets in every layout (tests, CPU demo)
"""
