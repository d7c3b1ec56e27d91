"""`python -m jepa_jax.bench ...` (also how `train` and `max-batch` start their subprocesses).
A user's mistake (a bad override, a missing plugin) ends it with one line on stderr."""

from jepa_jax.bench.cli import main
from jepa_jax.errors import exit_on_user_error

if __name__ == "__main__":
    exit_on_user_error(main)
