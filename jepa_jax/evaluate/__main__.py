"""`python -m jepa_jax.evaluate ...`: see jepa_jax/evaluate/__init__.py."""

import sys

from jepa_jax.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
