"""Loading checkpoints of other implementations into helmlm models."""

from helmlm.compat.reference import ReferenceCompatError, load_reference, reference_config

__all__ = ["ReferenceCompatError", "load_reference", "reference_config"]
