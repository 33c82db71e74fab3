"""The positional hypothesis (Nanda 2023): does a model represent "the 4th word" rather than
"token 7"?

1. Data: a fixed prefix, then `n_words` random words from the shipped list (half of them one token
   for this tokenizer, half longer, so word index and token position come apart). Each word
   token is labelled with its word's index (0 .. n_words-1); the prefix is unlabelled.
2. Probes: a word-index probe on the residual stream at every layer (`probe_sweep`), held out by
   prompt, beside its controls: the absolute position alone (the key comparison), shuffled labels,
   and the same probe on a randomly re-initialised copy of the model.
3. The causal check, on IOI: the S-inhibition heads' output at END is patched from a prompt whose
   subject is named first (BABA, other names) into a prompt whose subject is named second (ABBA).
   From the same template the names stand at the same positions; from another template they stand
   elsewhere. If what the heads move is "the subject is the first/second name", both patches move
   the logit difference alike (ratio near 1); if it is an absolute position, the cross-template
   patch points at the wrong tokens. A third patch, from a prompt with the subject second as in the
   target (only the names differ), measures what the name tokens alone carry.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Callable, Sequence

import torch
from torch import Tensor

from mechscope.analysis.circuit import head_name, parse_heads
from mechscope.errors import InputError
from mechscope.models.hooked import HookedModel, technique
from mechscope.probes.sweep import ProbeDataset, probe_sweep, residual_sites
from mechscope.tasks.ioi import BABA, NAMES, OBJECTS, PLACES


@dataclass(frozen=True)
class PositionSettings:
    n: int = 1000  # word-list prompts for the probes
    n_words: int = 10
    prefix: str = "Here is a list of words:"
    seed: int = 0
    test_fraction: float = 0.2
    n_ioi: int = 48  # IOI prompts for the causal check
    ioi_n: int = 24  # prompts of the IOI study that finds the S-inhibition heads (when not given)
    ioi_n_path: int = 12
    layers: tuple[int, ...] | None = None  # residual streams to probe after these layers (default: all)

    def __post_init__(self):
        if self.n < 5:
            raise InputError(f"n (word-list prompts) must be at least 5 to hold some out, not {self.n}")
        if not 2 <= self.n_words <= 50:
            raise InputError(f"n_words must be between 2 and 50, not {self.n_words}")
        if self.n_ioi < 1:
            raise InputError(f"n_ioi must be at least 1, not {self.n_ioi}")


def words() -> list[str]:
    text = (files("mechscope.studies") / "data" / "words.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def word_lists(model: HookedModel, s: PositionSettings) -> tuple[ProbeDataset, list[str], dict[int, int]]:
    """(the dataset, its prompts as text, how many sampled words have each token count)."""
    if model.tokenizer is None:
        raise InputError("the positional study needs the model's tokenizer")
    pieces = {w: model._encode(" " + w, prepend_bos=False)[0] for w in words()}
    short = [w for w, ids in pieces.items() if len(ids) == 1]
    long = [w for w, ids in pieces.items() if 2 <= len(ids) <= 4]
    if len(short) < s.n_words or len(long) < 2:
        raise InputError(f"this tokenizer makes {len(short)} of the study's words one token and {len(long)} two "
                         "to four tokens; the study needs both kinds")
    prefix = model._encode(s.prefix, None)[0]
    rng = random.Random(s.seed)
    rows, labels, texts, counts = [], [], [], {}
    for _ in range(s.n):
        chosen = [rng.choice(short if rng.random() < 0.5 else long) for _ in range(s.n_words)]
        ids, lab = list(prefix), [-1] * len(prefix)
        for i, w in enumerate(chosen):
            ids += pieces[w]
            lab += [i] * len(pieces[w])
            counts[len(pieces[w])] = counts.get(len(pieces[w]), 0) + 1
        rows.append(ids)
        labels.append(lab)
        texts.append(s.prefix + "".join(" " + w for w in chosen))
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [model.pad_token_id] * (width - len(r)) for r in rows])  # [prompt, pos]
    label = torch.tensor([r + [-1] * (width - len(r)) for r in labels])  # [prompt, pos]
    return ProbeDataset(tokens, label), texts, dict(sorted(counts.items()))


def cross_template(model: HookedModel, heads: Sequence, n: int, seed: int) -> dict:
    """The causal check of step 3: mean change in logit difference (IO - S) when the heads' END
    output is patched from each kind of source prompt."""
    heads = sorted(parse_heads(heads))
    single = [w for w in NAMES if len(model._encode(w, False)[0]) == 1]
    places = [w for w in PLACES if len(model._encode(w, False)[0]) == 1]
    objects = [w for w in OBJECTS if len(model._encode(w, False)[0]) == 1]
    if len(single) < 4 or not places or not objects:
        raise InputError("too few single-token names, places or objects for this tokenizer")

    def first_name_position(i: int) -> int:
        return len(model._encode(BABA[i].split("{S1}")[0], None)[0])

    where = {i: first_name_position(i) for i in range(len(BABA))}
    rng = random.Random(seed)
    targets, same, cross, order, io_ids, s_ids = [], [], [], [], [], []
    for _ in range(n):
        i = rng.randrange(len(BABA))
        others = [j for j in range(len(BABA)) if where[j] != where[i]]
        j = rng.choice(others)
        io, s, a, b = rng.sample(single, 4)
        fill = dict(P=rng.choice(places), O=rng.choice(objects))
        abba = BABA[i].replace("{S1} and{IO}", "{IO} and{S1}", 1)
        targets.append(abba.format(IO=io, S1=s, S2=s, **fill))
        same.append(BABA[i].format(IO=a, S1=b, S2=b, **fill))  # subject first, other names
        cross.append(BABA[j].format(IO=a, S1=b, S2=b, **fill))  # subject first, names elsewhere
        order.append(abba.format(IO=a, S1=b, S2=b, **fill))  # subject second as in the target
        io_ids.append(model._encode(io, False)[0][0])
        s_ids.append(model._encode(s, False)[0][0])
    io_ids, s_ids = torch.tensor(io_ids, device=model.device), torch.tensor(s_ids, device=model.device)
    tokens, end = model.to_tokens(targets), model.last_positions(targets)  # [prompt, pos], [prompt]
    rows = torch.arange(n, device=model.device)

    def logit_diff(fwd_hooks=()) -> Tensor:  # [prompt]
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
        at = logits[rows, end]  # [prompt, d_vocab]
        return (at.gather(1, io_ids[:, None]) - at.gather(1, s_ids[:, None]))[:, 0].double().cpu()

    def patched_from(sources: list[str]) -> Tensor:
        layers = sorted({l for l, _ in heads})
        names = [f"blocks.{l}.attn.hook_z" for l in layers]
        src_end = model.last_positions(sources)
        with torch.no_grad():
            _, cache = model.run_with_cache(model.to_tokens(sources), names_filter=names)

        def hook_for(layer: int):
            chosen = [h for l, h in heads if l == layer]
            source = cache[f"blocks.{layer}.attn.hook_z"][rows, src_end]  # [prompt, head, d_head]

            def put(z: Tensor, hook) -> Tensor:  # z [prompt, pos, head, d_head]
                z = z.clone()
                z[rows[:, None], end[:, None], torch.tensor(chosen, device=z.device)] = source[:, chosen]
                return z

            return put

        return logit_diff([(f"blocks.{l}.attn.hook_z", hook_for(l)) for l in layers])

    clean = logit_diff()
    effects = {name: (clean - patched_from(src)) for name, src in
               (("same_template", same), ("cross_template", cross), ("same_order", order))}
    mean = {k: v.mean().item() for k, v in effects.items()}
    sem = {k: (v.std().item() / n ** 0.5 if n > 1 else None) for k, v in effects.items()}
    return {
        "heads": [head_name(h) for h in heads], "n_prompts": n, "clean_logit_diff": clean.mean().item(),
        "same_template_effect": mean["same_template"], "cross_template_effect": mean["cross_template"],
        "same_order_effect": mean["same_order"], "standard_errors": sem,
        "cross_template_ratio": mean["cross_template"] / mean["same_template"] if mean["same_template"] else None,
        "effects": {k: v.tolist() for k, v in effects.items()},
        "prompts": {"target": targets, "same_template": same, "cross_template": cross, "same_order": order},
        "example": {"target": targets[0], "same_template": same[0], "cross_template": cross[0],
                    "same_order": order[0]},
    }


@technique
def run_positions(model: HookedModel, settings: PositionSettings = PositionSettings(), *,
                  heads: Sequence | None = None, log: Callable[[str], None] = lambda text: None,
                  progress: bool = False) -> dict:
    """Run the study; returns what `mechscope positions` writes to positions.json."""
    s = settings
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str):
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 2)
        log(f"{name}: {timings[name]:.1f} s")

    dataset, texts, counts = word_lists(model, s)
    chosen = range(model.cfg.n_layers) if s.layers is None else sorted(set(s.layers))
    if not all(0 <= l < model.cfg.n_layers for l in chosen):
        raise InputError(f"layers must lie in 0 .. {model.cfg.n_layers - 1}; got {list(chosen)}")
    sites = residual_sites(model)[:1] + [f"blocks.{l}.hook_resid_post" for l in chosen]
    sweep = probe_sweep(model, dataset, sites=sites, test_fraction=s.test_fraction, seed=s.seed, log=log)
    step("probes and controls")
    v, metrics = sweep.values, sweep.labels["metric"]

    def column(name: str) -> list[float]:
        return v[:, metrics.index(name)].tolist()

    layers = ["embed"] + [str(l) for l in chosen]
    best = int(v[:, metrics.index("accuracy")].argmax())
    per_index = sweep.extra["per_class_f1"][sites[best]]

    ioi_note = "heads given"
    if heads is None:
        from mechscope.studies.ioi import Settings, run_ioi

        found = run_ioi(model, Settings(n=s.ioi_n, n_path=s.ioi_n_path, seed=s.seed), progress=progress,
                        log=log, stop_after="S-inhibition")
        heads = found["circuit"]["s_inhibition"]
        ioi_note = f"found by the IOI study ({s.ioi_n} prompts, {s.ioi_n_path} for path patching)"
        step("IOI study to S-inhibition")
    causal = cross_template(model, heads, s.n_ioi, s.seed) if heads else None
    if causal is None:
        ioi_note += "; none, so no causal check"
    step("cross-template patching")
    return {
        "model": model.cfg.model_name,
        "family": model.cfg.family,
        "settings": asdict(s),
        "n_prompts": s.n,
        "n_rows": sweep.extra["n_rows"],
        "word_tokens": counts,
        "layers": layers,
        "best_layer": layers[best],
        "accuracy": column("accuracy"),
        "train_accuracy": column("train_accuracy"),
        "chance": column("chance"),
        "position_baseline": column("position_baseline"),
        "random_init_control": column("random_init_control"),
        "shuffled_labels": column("shuffled_labels"),
        "per_index_f1": per_index,
        "confusion": sweep.extra["best"]["confusion"],
        "direction_cosines": sweep.extra.get("direction_cosines"),
        "heads_source": ioi_note,
        "causal": causal,
        "cross_template_ratio": causal["cross_template_ratio"] if causal else None,
        "examples": texts[:3],
        "seconds": round(time.perf_counter() - start, 2),
        "step_seconds": timings,
    }
