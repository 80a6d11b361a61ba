"""lcx: packed long-context language-model training and serving in JAX."""

__version__ = "0.1.0"
