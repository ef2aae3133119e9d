"""One reader per published dataset layout; `READERS` maps `--source` names to them."""

from __future__ import annotations

from imprint_jax.data_prep.readers import dreambooth, images, mvimgnet, ppr10k, vipseg, youtube_vos

READERS = {m.NAME: m for m in (mvimgnet, youtube_vos, vipseg, ppr10k, images, dreambooth)}
