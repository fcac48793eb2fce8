"""Training: optimizer split and learning-rate schedule (the trainer, data and checkpoints build on these)."""

from helmlm.training.optim import HybridOptimizer, build_optimizer, lr_multiplier, parameter_roles

__all__ = ["HybridOptimizer", "build_optimizer", "lr_multiplier", "parameter_roles"]
