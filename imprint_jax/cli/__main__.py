"""`python -m imprint_jax.cli` is the `imprint-jax` command."""

import sys

from imprint_jax.cli import main

sys.exit(main())
