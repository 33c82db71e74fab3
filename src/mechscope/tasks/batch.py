"""ContrastiveBatch: clean and corrupt prompts, tokenized alike, with the answer each should give.

Patching swaps activations position by position, so each clean/corrupt pair must tokenize to the
same length; prompts of different lengths may mix in one batch (right-padded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.models.hooked import HookedModel


def tokenize_pairs(
    model: "HookedModel", clean: Sequence[str], corrupt: Sequence[str], *, where: Sequence[str] | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """(clean tokens, corrupt tokens, each pair's last real position), right-padded alike.

    Raises InputError naming the first pair (or `where[i]`, e.g. a file line) whose prompts differ
    in token length."""
    if len(clean) != len(corrupt):
        raise InputError(f"{len(clean)} clean prompts but {len(corrupt)} corrupt ones; they go in pairs")
    if not clean:
        raise InputError("no prompts: give at least one clean/corrupt pair")
    for i, (a, b) in enumerate(zip(clean, corrupt)):
        ta, tb = model.to_str_tokens(a), model.to_str_tokens(b)
        if len(ta) != len(tb):
            raise InputError(
                f"{_at(where, i)}: the clean prompt is {len(ta)} tokens and the "
                f"corrupt one {len(tb)}; patching needs equal lengths.\n  clean:   {ta}\n  corrupt: {tb}\n"
                "Choose words that are one token each (e.g. names with a leading space)."
            )
    return model.to_tokens(list(clean)), model.to_tokens(list(corrupt)), model.last_positions(list(clean))


def _at(where: Sequence[str] | None, i: int, kind: str = "pair") -> str:
    """How an error names the i-th input: its place (e.g. a file line) when known."""
    return where[i] if where else f"{kind} {i}"


def check_direction(direction: str) -> None:
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' (clean into corrupt) or 'noise' (corrupt into clean), "
                         f"not {direction!r}")


@dataclass(frozen=True)
class ContrastiveBatch:
    """Clean/corrupt token pairs and, per prompt, the answer, the wrong answer and the read position.

    `clean`, `corrupt`: [batch, pos]; `answer`, `wrong`, `read_pos`: [batch]."""

    clean: Int[Tensor, "batch pos"]
    corrupt: Int[Tensor, "batch pos"]
    answer: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    read_pos: Int[Tensor, " batch"]
    clean_prompts: tuple[str, ...]
    corrupt_prompts: tuple[str, ...]
    groups: tuple[str, ...] | None = None  # e.g. each prompt's template, for per-group statistics

    def __len__(self) -> int:
        return self.clean.shape[0]

    def rows(self, start: int, stop: int) -> "ContrastiveBatch":
        """Prompts start..stop-1 as a batch of their own, padded as this one is (same positions), so
        that a per-position result of the part lines up with the whole's."""
        part = slice(start, stop)
        return ContrastiveBatch(self.clean[part], self.corrupt[part], self.answer[part], self.wrong[part],
                                self.read_pos[part], self.clean_prompts[part], self.corrupt_prompts[part],
                                None if self.groups is None else self.groups[part])

    def take(self, rows: Tensor, n_pos: int) -> "ContrastiveBatch":
        """The prompts `rows` (indices), cut to their first n_pos positions (at least every read
        position: with causal attention, nothing after it changes what is read there)."""
        if int(self.read_pos[rows].max()) >= n_pos:
            raise InputError(f"n_pos {n_pos} would cut off a read position ({int(self.read_pos[rows].max())})")
        idx = rows.tolist()
        return ContrastiveBatch(self.clean[rows, :n_pos], self.corrupt[rows, :n_pos], self.answer[rows],
                                self.wrong[rows], self.read_pos[rows], tuple(self.clean_prompts[i] for i in idx),
                                tuple(self.corrupt_prompts[i] for i in idx),
                                None if self.groups is None else tuple(self.groups[i] for i in idx))

    def source_and_target(self, direction: str) -> tuple[Tensor, Tensor]:
        """(the run patched from, the run patched into): denoising patches clean into corrupt,
        noising corrupt into clean."""
        check_direction(direction)
        return (self.clean, self.corrupt) if direction == "denoise" else (self.corrupt, self.clean)

    @property
    def equal_lengths(self) -> bool:
        return bool((self.read_pos == self.read_pos[0]).all())

    @classmethod
    def from_pairs(
        cls,
        model: "HookedModel",
        clean: Sequence[str],
        corrupt: Sequence[str],
        answers: Sequence[str],
        wrongs: Sequence[str],
        *,
        where: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> "ContrastiveBatch":
        """Answers are single tokens, written as they follow the prompt (usually with a leading space)."""
        if not len(answers) == len(wrongs) == len(clean):
            raise InputError(f"{len(clean)} prompts, {len(answers)} answers and {len(wrongs)} wrong answers; "
                             "give one of each per prompt")
        clean_tokens, corrupt_tokens, read_pos = tokenize_pairs(model, clean, corrupt, where=where)

        def single(text: str, i: int, what: str) -> int:
            try:
                return model.to_single_token(text)
            except InputError as err:
                raise InputError(f"{_at(where, i)}: the {what} {err}") from None

        answer_ids = [single(a, i, "answer") for i, a in enumerate(answers)]
        wrong_ids = [single(w, i, "wrong answer") for i, w in enumerate(wrongs)]
        for i, (a, w) in enumerate(zip(answer_ids, wrong_ids)):
            if a == w:  # the logit difference would be 0 everywhere, and every normalized effect 0 / 0
                raise InputError(f"{_at(where, i)}: the answer {answers[i]!r} and the wrong "
                                 f"answer {wrongs[i]!r} are the same token; give two different answers")
        device = clean_tokens.device
        return cls(
            clean=clean_tokens,
            corrupt=corrupt_tokens,
            answer=torch.tensor(answer_ids, device=device),
            wrong=torch.tensor(wrong_ids, device=device),
            read_pos=read_pos,
            clean_prompts=tuple(clean),
            corrupt_prompts=tuple(corrupt),
            groups=None if groups is None else tuple(groups),
        )

    @classmethod
    def from_records(cls, model: "HookedModel", records: Iterable[dict], *, where: Sequence[str] | None = None):
        """From dicts with keys clean, corrupt, answer, wrong (and optionally template: the group)."""
        records = list(records)
        for i, r in enumerate(records):
            at = _at(where, i, "record")
            if not isinstance(r, dict):
                raise InputError(f'{at}: expected an object {{"clean", "corrupt", "answer", "wrong"}}, '
                                 f"not {type(r).__name__} {json.dumps(r)[:40]}")
            missing = {"clean", "corrupt", "answer", "wrong"} - set(r)
            if missing:
                raise InputError(f"{at}: missing {', '.join(sorted(missing))}; "
                                 'each needs {"clean", "corrupt", "answer", "wrong"}')
            for key in ("clean", "corrupt", "answer", "wrong"):
                if not isinstance(r[key], str) or not r[key]:
                    got = "an empty string" if r[key] == "" else f"{type(r[key]).__name__} {json.dumps(r[key])[:40]}"
                    raise InputError(f'{at}: "{key}" must be a non-empty string, not {got}')
        groups = [r["template"] for r in records] if all("template" in r for r in records) else None
        return cls.from_pairs(model, *([r[k] for r in records] for k in ("clean", "corrupt", "answer", "wrong")),
                              where=where, groups=groups)

    @classmethod
    def from_jsonl(cls, model: "HookedModel", path: str | Path) -> "ContrastiveBatch":
        """One JSON object per line: {"clean": str, "corrupt": str, "answer": str, "wrong": str}."""
        path = Path(path)
        records, where = [], []
        try:
            text = path.read_text(encoding="utf-8-sig")  # UTF-8 whatever the locale; a byte-order mark is fine
        except UnicodeDecodeError as err:
            raise InputError(f"{path} is not UTF-8 text (byte {err.start}); save the prompts as UTF-8 JSONL") from None
        except OSError as err:
            raise InputError(f"cannot read {path}: {err.strerror}") from None
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            where.append(f"{path}:{n}")
        if not records:
            raise InputError(f"{path} holds no prompts")
        return cls.from_records(model, records, where=where)
