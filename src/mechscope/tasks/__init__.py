"""Tasks: prompts and their contrasts (clean / corrupt), tokenized for a model."""

from mechscope.tasks.batch import ContrastiveBatch, tokenize_pairs
from mechscope.tasks.induction import induction
from mechscope.tasks.ioi import ioi

__all__ = ["ContrastiveBatch", "induction", "ioi", "tokenize_pairs"]
