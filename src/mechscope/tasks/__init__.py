"""Tasks: prompts and their contrasts (clean / corrupt), tokenized for a model."""

from mechscope.tasks.batch import ContrastiveBatch, tokenize_pairs
from mechscope.tasks.ioi import ioi

__all__ = ["ContrastiveBatch", "ioi", "tokenize_pairs"]
