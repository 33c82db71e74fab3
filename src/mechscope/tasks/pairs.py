"""Clean/corrupt prompt pairs: patching swaps activations position by position, so each pair must
tokenize to the same length."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from jaxtyping import Int
from torch import Tensor

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel


def tokenize_pairs(
    model: "HookedModel", clean: Sequence[str], corrupt: Sequence[str]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """(clean tokens, corrupt tokens, each pair's last real position), right-padded alike.

    Raises InputError naming the first pair whose two prompts differ in token length.
    """
    if len(clean) != len(corrupt):
        raise InputError(f"{len(clean)} clean prompts but {len(corrupt)} corrupt ones; they go in pairs")
    if not clean:
        raise InputError("no prompts: give at least one clean/corrupt pair")
    for i, (a, b) in enumerate(zip(clean, corrupt)):
        ta, tb = model.to_str_tokens(a), model.to_str_tokens(b)
        if len(ta) != len(tb):
            raise InputError(
                f"pair {i}: the clean prompt is {len(ta)} tokens and the corrupt one {len(tb)}; "
                f"patching needs equal lengths.\n  clean:   {ta}\n  corrupt: {tb}\n"
                "Choose words that are one token each (e.g. names with a leading space)."
            )
    return model.to_tokens(list(clean)), model.to_tokens(list(corrupt)), model.last_positions(list(clean))
