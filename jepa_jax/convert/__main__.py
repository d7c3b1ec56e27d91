import sys

from jepa_jax.convert.cli import main

sys.exit(main())
