"""`python -m jepa_jax.bench ...` (also how `train` and `max-batch` start their subprocesses)."""

from jepa_jax.bench.cli import main

if __name__ == "__main__":
    main()
