"""The settings of one `imprint-jax prepare` build (the command's flags of the same names)."""

from __future__ import annotations

import dataclasses

from imprint_jax.errors import UserError

# The `--source` names: every reader in readers/ by its NAME, and synthetic (tests/test_prepare.py
# checks the list against `readers.READERS`; here so that `prepare --help` imports no reader).
SOURCES = ("mvimgnet", "youtube_vos", "vipseg", "ppr10k", "images", "dreambooth", "synthetic")
PAIRINGS = ("views", "pairs")
INSTANCES = ("all", "largest")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """Crop sizes, pair sampling and filters of a build (the CLI flags of the same names).

  encoder_size: E, object crop side in pixels.
  generator_size: G, target crop side in pixels.
  window: T, multi-view pairs only use views i, j with |i - j| <= T (frame positions).
  context: target crop side / the object box's longer side (clamped to the frame).
  min_area, max_area: allowed object mask area, as a fraction of the frame.
  min_size: minimum object box side in source pixels.
  min_connected: minimum share of the mask held by its largest connected component.
  val_fraction: share of groups (videos/objects/...) held out as the "val" split.
  pairs_per_instance: pairs sampled per object instance (<= 0: every allowed pair); for
    multi-view sources only with pairing "pairs".
  pairing: multi-view sources (mvimgnet): "views" keeps every valid view of an object (kind
    "view" records + `views-<split>.json`) and the training pipeline draws a fresh pair
    |i - j| <= data.window every time it visits the object, as the paper samples pairs during
    training; "pairs" fixes up to pairs_per_instance pairs |i - j| <= window here. Other
    sources always fix their pairs.
  instances: image sources (images): "all" makes a record of every valid instance of an
    image; "largest" only of its largest valid instance (most mask pixels; ties: the first
    in instance order), the paper's Pixabay test protocol ("a foreground object is selected
    from each image").
  groups_per_shard: groups per phase-1 work unit (the resume granularity).
  num_shards: final shards per split; 0 picks one per ~256 MiB.
  seed: fixes the split, the pair sampling and hence every output byte.
  """

  encoder_size: int = 224
  generator_size: int = 512
  window: int = 7
  context: float = 2.0
  min_area: float = 0.01
  max_area: float = 0.9
  min_size: int = 48
  min_connected: float = 0.8
  val_fraction: float = 0.02
  pairs_per_instance: int = 6
  pairing: str = "views"
  instances: str = "all"
  groups_per_shard: int = 64
  num_shards: int = 0
  seed: int = 0

  def validate(self) -> "PrepareConfig":
    """Returns self; raises UserError naming the first bad value."""
    checks = [
        (self.encoder_size >= 8, "--encoder-size must be >= 8"),
        (self.generator_size >= 8, "--generator-size must be >= 8"),
        (self.window >= 1, "--window must be >= 1"),
        (self.context >= 1.0, "--context must be >= 1.0"),
        (0.0 <= self.min_area <= self.max_area <= 1.0,
         "--min-area and --max-area must satisfy 0 <= min <= max <= 1"),
        (self.min_size >= 1, "--min-size must be >= 1"),
        (0.0 <= self.min_connected <= 1.0, "--min-connected must be in [0, 1]"),
        (0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1)"),
        (self.pairing in PAIRINGS, f"--pairing must be one of {', '.join(PAIRINGS)}"),
        (self.instances in INSTANCES, f"--instances must be one of {', '.join(INSTANCES)}"),
        (self.groups_per_shard >= 1, "--groups-per-shard must be >= 1"),
        (self.num_shards >= 0, "--num-shards must be >= 0"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"{message} (got {self})")
    return self
