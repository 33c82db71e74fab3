"""Circuit evaluation by knockout (Wang et al. 2022, section 4): a head outside the circuit is
mean-ablated, its output (hook_z) replaced at each position by its mean over the reference ("ABC")
prompts of the same template, so that only the circuit carries information about the names.

F(M): the model's logit difference; F(C): with every head outside C knocked out.
- faithfulness: F(C) / F(M);
- completeness: for class subsets K, |F(C \\ K) - F(M \\ K)| should stay small (a complete circuit
  and the model lose the same when K goes); a greedy search looks for the worst K;
- minimality: for each head v, max over K of |F(C \\ (K + v)) - F(C \\ K)| should be large (every head
  matters for some K); K is tried empty and as v's own class.

`Knockouts` runs many knockout sets as one batch and unembeds only the read positions. Each set
resumes from a recorded run that knocks out the same heads in the layers before it: the clean run
(from the first ablated layer), or a run recorded with `remember` (a circuit C, for the sets C \\ K
that completeness and minimality try, from the first layer of K).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.metrics import at_positions, logit_diff, narrow
from mechscope.models.hooked import HookedModel, technique
from mechscope.patching.resume import LayerInputs
from mechscope.patching.suffix import length_buckets
from mechscope.progress import progress_bar
from mechscope.tasks.batch import ContrastiveBatch

Head = tuple[int, int]


def parse_heads(heads: Iterable[Head | str]) -> set[Head]:
    """{(layer, head)} from tuples or "layer.head" strings."""
    out = set()
    for h in heads:
        layer, head = (int(x) for x in h.split(".")) if isinstance(h, str) else h
        out.add((int(layer), int(head)))
    return out


def head_name(head: Head) -> str:
    return f"{head[0]}.{head[1]}"


def group_means(model: HookedModel, batch: ContrastiveBatch, reference: ContrastiveBatch | None = None,
                chunk: int = 16) -> dict[str, Tensor]:
    """For each prompt of `batch`, each hook_z's mean over the corrupt prompts of `reference` (default:
    the batch itself) in the same group (template), per position: {name: [batch, pos, head, d_head]}.
    Without groups, the whole reference is one group."""
    reference = batch if reference is None else reference
    groups = batch.groups or ("all",) * len(batch)
    ref_groups = reference.groups or ("all",) * len(reference)
    missing = sorted(set(groups) - set(ref_groups))
    if missing:
        raise InputError(f"the reference prompts have no template {missing[:3]}; give every template of the batch")
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    n_pos = batch.clean.shape[1]
    # Per group: the sum of each hook_z over its reference prompts [pos, head, d_head], a chunk at a time
    sums: dict[str, dict[str, Tensor]] = {name: {} for name in names}
    for first in range(0, len(reference), chunk):
        part = reference.corrupt[first:first + chunk]  # [part, ref_pos]
        with torch.no_grad():
            _, cache = model.run_with_cache(part, names_filter=names, stop_at_layer=model.cfg.n_layers)
        part_groups = ref_groups[first:first + chunk]
        rows = {g: torch.tensor([i for i, r in enumerate(part_groups) if r == g], device=model.device)
                for g in set(part_groups)}
        for name in names:
            z = cache[name]  # [part, ref_pos, head, d_head]
            z = torch.nn.functional.pad(z, (0, 0, 0, 0, 0, max(0, n_pos - z.shape[1])))[:, :n_pos]
            for g, r in rows.items():
                total = z[r].sum(0)  # [pos, head, d_head]
                sums[name][g] = sums[name][g] + total if g in sums[name] else total
        del cache
    counts = {g: ref_groups.count(g) for g in set(groups)}
    return {name: torch.stack([sums[name][g] / counts[g] for g in groups])  # [batch, pos, head, d_head]
            for name in names}


def knockout_hooks(model: HookedModel, keep: set[Head], means: dict[str, Tensor]) -> list:
    """Hooks that mean-ablate every head not in `keep` (one run of the batch)."""
    hooks = []
    for l in range(model.cfg.n_layers):
        ablate = torch.tensor([(l, h) not in keep for h in range(model.cfg.n_heads)], device=model.device)  # [head]
        if not ablate.any():
            continue
        mean = means[f"blocks.{l}.attn.hook_z"]
        hooks.append((f"blocks.{l}.attn.hook_z",
                      lambda act, hook, mean=mean, ablate=ablate: torch.where(ablate[:, None], mean, act)))
    return hooks


class Knockouts:
    """Logit differences of the clean prompts with heads knocked out, many knockout sets per batch.

    The prompts run in up to `buckets` groups of similar length (`length_buckets`), each cut at its
    own last read position, so that short prompts do not pay for the long ones' padding (IOI's 40:
    19% of the positions were padding, 7% with two groups); every figure is the prompt-weighted mean
    of the groups'. `means`: each prompt's mean head outputs, over the whole reference."""

    def __init__(self, model: HookedModel, batch: ContrastiveBatch, *, reference: ContrastiveBatch | None = None,
                 chunk: int = 4, progress: bool = False, buckets: int = 2):
        self.model, self.batch, self.chunk, self.progress = model, batch, chunk, progress
        self.heads = {(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)}
        self.means = group_means(model, batch, reference)  # [batch, pos, head, d_head] per layer
        self.parts = []
        for rows in length_buckets(batch.read_pos + 1, buckets):
            n_pos = int(batch.read_pos[rows].max()) + 1  # what comes after a read position changes nothing there
            part = batch.take(rows, n_pos)
            means = {name: m[rows.to(m.device), :n_pos] for name, m in self.means.items()}
            self.parts.append(_Bucket(model, part, means))
        self.weights = [len(p.batch) / len(batch) for p in self.parts]
        self.model_logit_diff = self._mean([[p.model_logit_diff] for p in self.parts])[0]  # F(M)

    def remember(self, keep: Iterable[Head]) -> bool:
        """Record the run that knocks out every head outside `keep` (itself resumed from the best run
        recorded so far): knockout sets that agree with it on the first layers resume from it.
        False if a recorded run already knocks out the same heads."""
        keep = set(keep)
        self.check(keep)
        return any([p.remember(keep) for p in self.parts])  # (a list: every part records)

    def forget(self, keep: Iterable[Head]) -> None:
        """Drop the recorded run of `keep` (its memory: a residual stream per layer); the unablated
        run stays. Runs resumed from it keep the layers they share with it."""
        for p in self.parts:
            p.forget(set(keep))

    def check(self, heads: Iterable[Head]) -> None:
        bad = sorted(set(heads) - self.heads)
        if bad:
            cfg = self.model.cfg
            raise InputError(f"heads {bad} are not in this model ({cfg.n_layers} layers x {cfg.n_heads} heads)")

    def logit_diffs(self, keeps: Sequence[set[Head]]) -> list[float]:
        """The mean logit difference with every head outside each `keeps[j]` knocked out."""
        with progress_bar(self.progress and len(keeps) > self.chunk, len(keeps) * len(self.parts), "knockouts") as bar:
            return self._mean([p.logit_diffs(keeps, self.chunk, bar) for p in self.parts])

    def _mean(self, per_part: list[list[float]]) -> list[float]:
        """Per knockout set, the prompt-weighted mean of the parts' mean logit differences."""
        return [sum(w * values[j] for w, values in zip(self.weights, per_part)) for j in range(len(per_part[0]))]


class _Bucket:
    """Knockouts of one group of prompts (see `Knockouts`), with each prompt's means given."""

    def __init__(self, model: HookedModel, batch: ContrastiveBatch, means: dict[str, Tensor]):
        self.model, self.batch, self.means = model, batch, means
        self.inputs = LayerInputs(model, len(batch))
        with torch.no_grad(), self.inputs.recording():
            final = model(batch.clean, stop_at_layer=model.cfg.n_layers)  # [batch, pos, d_model]: no logits
        self.model_logit_diff = self._logit_diffs(final, 1)[0]  # F(M), read as every knockout's is
        # Recorded runs to resume from: (which heads each knocks out [layer, head], its layers' inputs, its F)
        no_ablation = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool, device=model.device)
        self.bases: list[tuple[Tensor, LayerInputs, float]] = [(no_ablation, self.inputs, self.model_logit_diff)]

    def remember(self, keep: set[Head]) -> bool:
        ablate = self._ablated([keep])[0]  # [layer, head]
        base, start = self._base_for(ablate)
        if start == self.model.cfg.n_layers:
            return False
        known = self.bases[base][1]
        inputs = LayerInputs(self.model, len(self.batch))
        inputs.rest, inputs.resid = known.rest, list(known.resid[:start])
        hidden = known.resid[start]  # [batch, pos, d_model]
        with torch.no_grad():
            for layer in range(start, self.model.cfg.n_layers):
                inputs.resid.append(hidden)
                hidden = self._layer(hidden, layer, ablate[None])
        inputs.final = hidden
        self.bases.append((ablate, inputs, self._logit_diffs(hidden, 1)[0]))
        return True

    def forget(self, keep: set[Head]) -> None:
        ablate = self._ablated([keep])[0]  # [layer, head]
        self.bases = [self.bases[0]] + [b for b in self.bases[1:] if not torch.equal(b[0], ablate)]

    def logit_diffs(self, keeps: Sequence[set[Head]], chunk: int, bar) -> list[float]:
        n_layers = self.model.cfg.n_layers
        ablate = self._ablated(keeps)  # [variant, layer, head]
        plan = sorted((self._base_for(ablate[j])[::-1] + (j,) for j in range(len(keeps))))  # (start, base, variant)
        out = [0.0] * len(keeps)
        for start, base, j in plan:
            if start == n_layers:  # knocks out what a recorded run does
                out[j] = self.bases[base][2]
        plan = [p for p in plan if p[0] < n_layers]
        bar.advance(len(keeps) - len(plan))
        for i in range(0, len(plan), chunk):
            batch = plan[i:i + chunk]
            for (_, _, j), value in zip(batch, self._run(batch, ablate)):
                out[j] = value
            bar.advance(len(batch))
        return out

    def _base_for(self, ablate: Tensor) -> tuple[int, int]:
        """The recorded run that agrees with a knockout set ablate [layer, head] on the most leading
        layers, and the first layer where they differ (n_layers: none)."""
        firsts = []
        for base, _, _ in self.bases:
            differs = (ablate != base).any(-1).nonzero()  # layers where the set and the base differ
            firsts.append(int(differs[0]) if len(differs) else self.model.cfg.n_layers)
        best = max(range(len(self.bases)), key=lambda i: firsts[i])
        return best, firsts[best]

    def _ablated(self, keeps: Sequence[set[Head]]) -> Tensor:
        """Which heads each knockout set ablates: [variant, layer, head] booleans."""
        cfg = self.model.cfg
        ablate = torch.ones(len(keeps), cfg.n_layers, cfg.n_heads, dtype=torch.bool, device=self.model.device)
        for j, keep in enumerate(keeps):
            for l, h in keep:
                ablate[j, l, h] = False
        return ablate

    def _run(self, plan: list[tuple[int, int, int]], ablate: Tensor) -> list[float]:
        """Knockout sets (start, base, variant), by start: each joins the batch at its start layer with
        its base's residual stream there, so every set runs only the layers after its base's."""
        k, hidden = len(plan), None
        for layer in range(plan[0][0], self.model.cfg.n_layers):
            joining = [self.bases[base][1].resid[layer] for start, base, _ in plan if start == layer]
            if joining:
                hidden = torch.cat(([hidden] if hidden is not None else []) + joining)  # [present * batch, pos, d_model]
            present = hidden.shape[0] // len(self.batch)
            hidden = self._layer(hidden, layer, ablate[[j for _, _, j in plan[:present]]])
        return self._logit_diffs(hidden, k)

    def _layer(self, hidden: Tensor, layer: int, ablate: Tensor) -> Tensor:
        """One layer on hidden [variant * batch, pos, d_model], variant j knocking out ablate[j] [layer, head]."""
        k, b, name = ablate.shape[0], len(self.batch), f"blocks.{layer}.attn.hook_z"
        mask = ablate[:, layer][:, None, None, :, None]  # [variant, 1, 1, head, 1]

        def knock(act, hook):
            act = act.view(k, b, *act.shape[1:])  # [variant, batch, pos, head, d_head]
            return torch.where(mask, self.means[name], act).flatten(0, 1)

        with torch.no_grad(), self.model.hooks(fwd_hooks=[(name, knock)] if mask.any() else []):
            return self.inputs.run_layers(hidden, layer, layer + 1, k)

    def _logit_diffs(self, final: Tensor, k: int) -> list[float]:
        """Mean logit difference of k variants from their residual streams after the last layer."""
        resid = at_positions(final.view(k, len(self.batch), *final.shape[1:]), self.batch.read_pos)  # [k, batch, d_model]
        tokens, fn = narrow(logit_diff, self.batch)  # only the two logits it reads
        with torch.no_grad():
            return fn(self.model.logits_from_resid(resid, tokens), self.batch).mean(-1).tolist()


@dataclass(frozen=True)
class Faithfulness:
    model_logit_diff: float  # F(M)
    circuit_logit_diff: float  # F(C)
    n_heads: int  # in the circuit

    @property
    def ratio(self) -> float:
        return self.circuit_logit_diff / self.model_logit_diff

    def __str__(self) -> str:
        return (f"F(M) {self.model_logit_diff:.3f}, F(C) {self.circuit_logit_diff:.3f}: faithfulness "
                f"{self.ratio:.3f} ({self.n_heads} heads)")


def _knockouts(model, batch, knockouts: Knockouts | None, reference) -> Knockouts:
    return knockouts if knockouts is not None else Knockouts(model, batch, reference=reference)


@technique
def faithfulness(model: HookedModel, batch: ContrastiveBatch, circuit: Iterable[Head | str], *,
                 reference: ContrastiveBatch | None = None, knockouts: Knockouts | None = None) -> Faithfulness:
    """F(C) / F(M) on the clean prompts, every head outside `circuit` mean-ablated over the reference
    (default: the batch's own corrupt prompts) of its template."""
    keep = parse_heads(circuit)
    ko = _knockouts(model, batch, knockouts, reference)
    ko.check(keep)
    (circuit_ld,) = ko.logit_diffs([keep])
    return Faithfulness(model_logit_diff=ko.model_logit_diff, circuit_logit_diff=circuit_ld, n_heads=len(keep))


@dataclass(frozen=True)
class Completeness:
    """The worst class subset K found: |F(C \\ K) - F(M \\ K)| (`gap`), and every K tried."""

    removed: tuple[str, ...]  # the classes of K
    circuit_logit_diff: float  # F(C \ K)
    model_logit_diff: float  # F(M \ K)
    gap: float
    relative: float  # gap / F(M)
    tried: list[dict] = field(default_factory=list)


def completeness(model: HookedModel, batch: ContrastiveBatch, classes: Mapping[str, Iterable[Head | str]], *,
                 reference: ContrastiveBatch | None = None, knockouts: Knockouts | None = None) -> Completeness:
    """Greedy search over unions of whole classes K for the largest |F(C \\ K) - F(M \\ K)|: add the class
    that widens the gap most while the gap grows."""
    ko = _knockouts(model, batch, knockouts, reference)
    members = {c: parse_heads(h) for c, h in classes.items() if h}
    circuit = set().union(*members.values())
    ko.check(circuit)
    added = [circuit] if ko.remember(circuit) else []  # recorded runs this search adds, dropped at its end
    fc, fm = ko.logit_diffs([circuit, ko.heads])
    tried = [{"removed": [], "circuit": fc, "model": fm, "gap": abs(fc - fm)}]
    best, chosen = tried[0], []
    while len(chosen) < len(members):
        options = [c for c in members if c not in chosen]
        keeps = []
        for c in options:
            gone = set().union(*(members[x] for x in chosen + [c]))
            keeps += [circuit - gone, ko.heads - gone]
        values = ko.logit_diffs(keeps)
        step = [{"removed": chosen + [c], "circuit": values[2 * i], "model": values[2 * i + 1],
                 "gap": abs(values[2 * i] - values[2 * i + 1])} for i, c in enumerate(options)]
        tried += step
        top = max(step, key=lambda t: t["gap"])
        if top["gap"] <= best["gap"]:
            break
        best, chosen = top, top["removed"]
        gone = set().union(*(members[x] for x in chosen))
        new = [keep for keep in (circuit - gone, ko.heads - gone) if ko.remember(keep)]  # the next round starts here
        for keep in added:  # ... not from these any more (each of its sets agrees longer with the new runs)
            ko.forget(keep)
        added = new
    for keep in added:
        ko.forget(keep)
    return Completeness(removed=tuple(best["removed"]), circuit_logit_diff=best["circuit"],
                        model_logit_diff=best["model"], gap=best["gap"], relative=best["gap"] / ko.model_logit_diff,
                        tried=tried)


def minimality(model: HookedModel, batch: ContrastiveBatch, classes: Mapping[str, Iterable[Head | str]], *,
               reference: ContrastiveBatch | None = None, knockouts: Knockouts | None = None) -> dict[str, dict]:
    """For each head v of the circuit: {"score": max over K of |F(C \\ (K + v)) - F(C \\ K)|, "K": "none" or
    "class" (the rest of v's class), "relative": score / F(C)}, keyed "layer.head"."""
    ko = _knockouts(model, batch, knockouts, reference)
    members = {c: parse_heads(h) for c, h in classes.items() if h}
    circuit = set().union(*members.values())
    ko.check(circuit)
    # Each class in turn: C without it is recorded (unless it was), its sets run from it, and it is dropped
    added = ko.remember(circuit)
    (fc,) = ko.logit_diffs([circuit])
    values = []
    for c, heads_c in members.items():
        rest = circuit - heads_c
        recorded = ko.remember(rest)
        values.append(ko.logit_diffs([rest] + [keep for v in sorted(heads_c) for keep in (circuit - {v}, rest | {v})]))
        if recorded:
            ko.forget(rest)
    if added:
        ko.forget(circuit)
    out = {}
    for (c, heads_c), (without_class, *pairs) in zip(members.items(), values):
        for i, v in enumerate(sorted(heads_c)):
            without_v, only_v_of_class = pairs[2 * i: 2 * i + 2]
            drops = {"none": abs(fc - without_v), "class": abs(only_v_of_class - without_class)}
            k = max(drops, key=drops.get)
            out[v] = {"class": c, "score": drops[k], "K": k, "relative": drops[k] / abs(fc) if fc else float("inf")}
    return {head_name(v): out[v] for v in sorted(out)}
