"""Evaluation of causal language models.

- :func:`validation_loss`: token-weighted next-token loss and perplexity over packed rows (what the trainer reports
  as ``val_loss`` / ``val_ppl``), on one process or many.
- :func:`perplexity`: loss, perplexity and bits per byte of any causal LM (helmlm or transformers) over documents,
  each scored from its own start, with a sliding window past the context (``helmlm perplexity``).
"""

from helmlm.eval.loss import validation_loss
from helmlm.eval.perplexity import perplexity

__all__ = ["perplexity", "validation_loss"]
