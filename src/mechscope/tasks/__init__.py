"""Tasks: prompts and their contrasts (clean / corrupt), tokenized for a model."""

from mechscope.tasks.pairs import tokenize_pairs

__all__ = ["tokenize_pairs"]
