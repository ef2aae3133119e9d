"""`imprint-jax prepare`: published dataset layouts -> preprocessed pair shards.

  prepare    `prepare()`: one dataset -> a prepared folder (splits, the build, the summary);
             the command's flags and runner are `imprint_jax/cli/{flags/,}prepare.py`
  config     PrepareConfig, the settings of a build
  build      the resumable parallel build of one split (work units, then TFDS shards)
  pairs      phase 1 for one group: frames -> valid views -> pair records
  shards     writing a prepared dataset (reading it: `imprint_jax.data.prepared`)
  readers/   one reader per published layout
  synthetic  small synthetic datasets in every layout (tests, CPU demo); pictures by `render`
  sources    `synthetic:<layout>` data sources of a run config -> prepared folders

Crop geometry and image loading are shared with compositing in `imprint_jax.data.crops`.
This package may import `imprint_jax.data`, `errors` and `progress` (no JAX: it needs no
devices); nothing in `imprint_jax` imports it (only the command line and the demo).
"""
