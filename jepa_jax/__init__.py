"""jepa_jax: I-JEPA pretraining in JAX/Flax with a pluggable attention seam."""
