"""A minimal, seedable IOI generator (Wang et al. 2022). The paper-style generator with all its
templates and corrupted distributions is the IOI study's; this one serves patching.

Clean: "When Mary and John went to the store, John gave a drink to" -> answer " Mary" (the indirect
object), wrong " John" (the subject). Corrupt "abc": the three names replaced by three other names,
as in the paper's ABC distribution, so the corrupt prompt carries no information about which of
Mary and John is the answer.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Sequence

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel

TEMPLATES = (  # IO: indirect object, S1 / S2: the subject's two mentions, P: place, O: object
    "When{IO} and{S1} went to the{P},{S2} gave a{O} to",
    "After{IO} and{S1} went to the{P},{S2} gave a{O} to",
    "While{IO} and{S1} were working at the{P},{S2} gave a{O} to",
    "When{IO} and{S1} got a{O} at the{P},{S2} decided to give it to",
    "Then,{IO} and{S1} went to the{P}, and{S2} handed a{O} to",
)
NAMES = (" Mary", " John", " Tom", " James", " Sarah", " Paul", " Lisa", " David", " Anna", " Mark",
         " Emma", " Peter", " Kate", " Daniel", " Laura", " Michael", " Alice", " Robert", " Jane", " Chris")
PLACES = (" store", " park", " school", " office", " garden", " station", " hospital", " restaurant")
OBJECTS = (" drink", " book", " ball", " letter", " gift", " key", " phone", " bag")


def ioi(
    n: int,
    *,
    seed: int = 0,
    model: "HookedModel | None" = None,
    templates: Sequence[int] | None = None,
) -> list[dict[str, str]]:
    """n IOI records {"clean", "corrupt", "answer", "wrong"} (for `ContrastiveBatch.from_records`).

    With a model, only names and words that are one token for its tokenizer are used, so each
    clean/corrupt pair has equal length. `templates` picks template indices (default: all), e.g.
    `templates=[0]` for prompts of equal length."""
    rng = random.Random(seed)
    single = (lambda w: len(model.to_str_tokens(w, prepend_bos=False)) == 1) if model else (lambda w: True)
    names = [w for w in NAMES if single(w)]
    places = [w for w in PLACES if single(w)]
    objects = [w for w in OBJECTS if single(w)]
    if len(names) < 5 or not places or not objects:
        raise InputError("too few single-token names, places or objects for this tokenizer")
    chosen = [TEMPLATES[i] for i in (templates if templates is not None else range(len(TEMPLATES)))]
    records = []
    for _ in range(n):
        template = rng.choice(chosen)
        place, obj = rng.choice(places), rng.choice(objects)
        a, b, c, d, e = rng.sample(names, 5)
        records.append({
            "clean": template.format(IO=a, S1=b, S2=b, P=place, O=obj),
            "corrupt": template.format(IO=c, S1=d, S2=e, P=place, O=obj),
            "answer": a,
            "wrong": b,
        })
    return records
