"""helmlm: hyperbolic large language models (HELM-D, HELM-MiCE) with Euclidean twins."""

__version__ = "0.1.0"
