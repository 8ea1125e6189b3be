"""asearcher_jax: long-horizon search agents trained with asynchronous RL in JAX."""

__version__ = "0.1.0"
