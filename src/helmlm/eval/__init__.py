"""Evaluation of causal language models.

- :func:`validation_loss`: token-weighted next-token loss and perplexity over packed rows (what the trainer reports
  as ``val_loss`` / ``val_ppl``), on one process or many.
"""

from helmlm.eval.loss import validation_loss

__all__ = ["validation_loss"]
