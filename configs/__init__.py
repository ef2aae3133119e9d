"""Training configs: `configs/<name>.py` defines `get_config(arg)`; `arg='tiny'` shrinks it."""
