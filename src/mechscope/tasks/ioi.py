"""The IOI dataset of Wang et al. 2022, paper style: 15 BABA templates and their ABBA twins.

Clean: "Then, John and Mary went to the store. John gave a drink to" -> answer " Mary" (the
indirect object, IO), wrong " John" (the subject, S, named twice: S1 and S2). Corruptions:
- "abc": IO, S1 and S2 replaced by three other names (the paper's ABC distribution): the corrupt
  prompt says nothing about which of the clean names is the answer;
- "flip": S2 replaced by IO, so the repeated name is the other one.
Each record names its template ("BABA-3", "ABBA-3", ...) so that analyses can group by it (the
paper's mean ablations are taken per template).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel
    from mechscope.tasks.batch import ContrastiveBatch

# BABA: the subject is named first. {S1} / {S2}: the subject's two mentions, {IO}: the indirect object.
BABA = (
    "Then,{S1} and{IO} went to the{P}.{S2} gave a{O} to",
    "Then,{S1} and{IO} had a lot of fun at the{P}.{S2} gave a{O} to",
    "Then,{S1} and{IO} were working at the{P}.{S2} decided to give a{O} to",
    "Then,{S1} and{IO} were thinking about going to the{P}.{S2} wanted to give a{O} to",
    "Then,{S1} and{IO} had a long argument, and afterwards{S2} said to",
    "After{S1} and{IO} went to the{P},{S2} gave a{O} to",
    "When{S1} and{IO} got a{O} at the{P},{S2} decided to give it to",
    "When{S1} and{IO} got a{O} at the{P},{S2} decided to give the{O} to",
    "While{S1} and{IO} were working at the{P},{S2} gave a{O} to",
    "While{S1} and{IO} were commuting to the{P},{S2} gave a{O} to",
    "After the lunch,{S1} and{IO} went to the{P}.{S2} gave a{O} to",
    "Afterwards,{S1} and{IO} went to the{P}.{S2} gave a{O} to",
    "Then,{S1} and{IO} had a long argument. Afterwards{S2} said to",
    "The{P}{S1} and{IO} went to had a{O}.{S2} gave it to",
    "Friends{S1} and{IO} found a{O} at the{P}.{S2} gave it to",
)
# ABBA twins: the indirect object is named first.
ABBA = tuple(t.replace("{S1} and{IO}", "{IO} and{S1}", 1) for t in BABA)
TEMPLATES = {**{f"BABA-{i}": t for i, t in enumerate(BABA)}, **{f"ABBA-{i}": t for i, t in enumerate(ABBA)}}

NAMES = (" Mary", " John", " Tom", " James", " Sarah", " Paul", " Lisa", " David", " Anna", " Mark", " Emma",
         " Peter", " Kate", " Daniel", " Laura", " Michael", " Alice", " Robert", " Jane", " Chris", " Richard",
         " Thomas", " Charles", " Joseph", " Steven", " George", " Edward", " Brian", " Kevin", " Jason",
         " Matthew", " Gary", " Eric", " Andrew", " Ryan", " Jacob", " Nicholas", " Jonathan", " Justin",
         " Scott", " Frank", " Adam", " Patrick", " Jack", " Dennis", " Jerry", " Aaron", " Henry", " Carl",
         " Arthur", " Roger", " Joe", " Juan", " Albert", " Fred", " Sam", " Ben", " Max", " Leo", " Ian",
         " Susan", " Karen", " Nancy", " Betty", " Helen", " Sandra", " Donna", " Carol", " Ruth", " Sharon",
         " Michelle", " Maria", " Amy", " Emily", " Rachel", " Julie", " Anne", " Diana", " Grace", " Rose",
         " Alex", " Amanda", " Jessica", " Rebecca", " Nicole", " Victoria", " Claire", " Sophie", " Lucy",
         " Megan", " Hannah", " Kelly", " Jenny", " Eva", " Nina", " Sara", " Tim", " Dan", " Bob", " Bill")
PLACES = (" store", " garden", " restaurant", " school", " hospital", " office", " house", " station", " park",
          " market", " library", " beach")
OBJECTS = (" ring", " kiss", " bone", " basketball", " computer", " necklace", " drink", " snack", " book",
           " ball", " letter", " gift", " key", " phone", " bag")


def ioi(
    n: int,
    *,
    seed: int = 0,
    model: "HookedModel | None" = None,
    templates: Sequence[str | int] | None = None,
    corrupt: str = "abc",
) -> list[dict[str, str]]:
    """n IOI records {"clean", "corrupt", "answer", "wrong", "template"} for
    `ContrastiveBatch.from_records`.

    templates: names ("BABA-0", "ABBA-5"; default: all 30) or indices into the BABA list (then
    BABA only); `templates=[0]` gives prompts of equal length. With a model, only names, places
    and objects that are one token for its tokenizer are used, and every pair is checked to have
    equal length. corrupt: "abc" or "flip".
    """
    if corrupt not in ("abc", "flip"):
        raise InputError(f"corrupt must be 'abc' (three other names) or 'flip' (S2 replaced by IO), not {corrupt!r}")
    chosen = list(TEMPLATES) if templates is None else [t if isinstance(t, str) else f"BABA-{t}" for t in templates]
    unknown = [t for t in chosen if t not in TEMPLATES]
    if unknown:
        raise InputError(f"unknown templates {unknown}; they are BABA-0 .. BABA-14 and ABBA-0 .. ABBA-14")
    single = (lambda w: len(model.to_str_tokens(w, prepend_bos=False)) == 1) if model else (lambda w: True)
    names = [w for w in NAMES if single(w)]
    places, objects = [w for w in PLACES if single(w)], [w for w in OBJECTS if single(w)]
    if len(names) < 5 or not places or not objects:
        raise InputError("too few single-token names, places or objects for this tokenizer")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        template = rng.choice(chosen)
        text, place, obj = TEMPLATES[template], rng.choice(places), rng.choice(objects)
        io, s, c, d, e = rng.sample(names, 5)
        clean = text.format(IO=io, S1=s, S2=s, P=place, O=obj)
        bad = text.format(IO=c, S1=d, S2=e, P=place, O=obj) if corrupt == "abc" else \
            text.format(IO=io, S1=s, S2=io, P=place, O=obj)
        if model is not None and len(model.to_str_tokens(clean)) != len(model.to_str_tokens(bad)):
            raise InputError(f"template {template} gives pairs of different lengths: {clean!r} / {bad!r}")
        records.append({"clean": clean, "corrupt": bad, "answer": io, "wrong": s, "template": template})
    return records


def name_positions(batch: "ContrastiveBatch") -> dict[str, Tensor]:
    """Where each prompt of an IOI batch names its people, from the clean tokens: {"IO", "S1", "S2",
    "END"} -> [batch] positions (IO: the indirect object; S1, S2: the subject's first and second
    mention; END: the read position)."""
    tokens = batch.clean  # [batch, pos]
    index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [batch, pos]
    before_end = index < batch.read_pos[:, None]
    is_io = (tokens == batch.answer[:, None]) & before_end  # [batch, pos]
    is_s = (tokens == batch.wrong[:, None]) & before_end
    if not (is_io.any(1).all() and (is_s.sum(1) >= 2).all()):
        raise InputError("not an IOI batch: each clean prompt must name the answer once and the wrong name "
                         "twice before its read position (use mechscope.tasks.ioi)")
    big = tokens.shape[1]
    return {
        "IO": torch.where(is_io, index, big).min(1).values,
        "S1": torch.where(is_s, index, big).min(1).values,
        "S2": torch.where(is_s, index, -1).max(1).values,
        "END": batch.read_pos.clone(),
    }
