"""`python -m esep_jax` is the `esep-jax` command."""

import sys

from esep_jax.cli import main

sys.exit(main())
