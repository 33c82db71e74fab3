"""The IOI study of Wang et al. 2022, automated for any supported model.

The steps follow the paper; each class of heads is defined by one test, recorded per head in
`evidence`. A threshold `tau` (a fraction of the model's logit difference F(M)) separates an effect
from noise.

1. F(M): the mean logit difference IO - S on clean prompts.
2. Name movers: heads whose direct effect on the logit difference (DLA) is at least tau, that attend
   from END to a name (weight >= 0.1) and whose OV circuit moves that name: they copy IO (copy
   score >= 0.5) or suppress S (negative copy score >= 0.5; GPT-2 has no such head, SmolLM2 does).
   Negative name movers: DLA <= -tau, attending to IO and suppressing it (or attending to S and
   copying it).
3. S-inhibition: path patching into the name movers' queries at END: effect <= -tau.
4. Induction and duplicate-token heads: path patching into the S-inhibition heads' values at S2:
   effect <= -tau, and an induction (resp. duplicate-token) score >= 0.3 on repeated random tokens.
5. Previous-token heads: path patching into the induction heads' keys at S1 + 1: effect <= -tau and
   a previous-token score >= 0.3. (`receiver_positions="all"` patches every position instead.)
6. Backup name movers: with the name movers knocked out, heads whose DLA grows by at least tau, to
   at least tau (a head that only harms less is not taking over).
7. The circuit's edges (path patching through each receiver alone), for the report.
8. Evaluation by knockout (mean over ABC prompts of each template): faithfulness, completeness,
   minimality.

Path patching runs on the first `n_path` prompts (it costs about one forward per sender head), the
rest on all `n`. With `screen="atp"`, steps 3 to 5 rank the senders by path attribution (a gradient
estimate of the same path effect) and path-patch exactly only the top `screen_top` and a random
sample of `screen_sample` others; `screen` in the output says what the sample found the ranking missed.
"""

from __future__ import annotations

import base64
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from mechscope import memory
from mechscope.analysis.circuit import Head, Knockouts, completeness, head_name, knockout_hooks, minimality
from mechscope.analysis.dla import direct_logit_attribution
from mechscope.analysis.heads import attention_from_end, copy_scores, head_scores
from mechscope.errors import InputError
from mechscope.models.hooked import HookedModel, technique
from mechscope.patching.exact import activation_patch
from mechscope.patching.path import path_patch, record_runs
from mechscope.patching.path_attribution import path_attribution
from mechscope.result import Result
from mechscope.tasks.batch import ContrastiveBatch
from mechscope.tasks.ioi import ioi, name_positions

CLASSES = ("name_mover", "negative_name_mover", "backup_name_mover", "s_inhibition", "induction",
           "duplicate_token", "previous_token")

# Wang et al. 2022, GPT-2 small.
PAPER_GPT2 = {
    "name_mover": ["9.9", "9.6", "10.0"],
    "negative_name_mover": ["10.7", "11.10"],
    "backup_name_mover": ["9.0", "9.7", "10.1", "10.2", "10.6", "10.10", "11.2", "11.9"],
    "s_inhibition": ["7.3", "7.9", "8.6", "8.10"],
    "induction": ["5.5", "5.8", "5.9", "6.9"],
    "duplicate_token": ["0.1", "0.10", "3.0"],
    "previous_token": ["2.2", "4.11"],
}


@dataclass(frozen=True)
class Settings:
    n: int = 40  # prompts for DLA, attention, copy scores and knockouts
    n_path: int = 16  # prompts for path patching (the costly step)
    seed: int = 0
    threshold: float = 0.01  # tau = threshold * F(M)
    attention_min: float = 0.1  # a name mover's attention from END to the name it moves
    copy_min: float = 0.5  # copy score of a name mover
    detector_min: float = 0.3  # induction, duplicate-token and previous-token scores
    reference_per_template: int = 5  # ABC prompts per template for the knockout means
    max_per_class: int | None = None  # keep only the strongest heads of each class
    # Where S-inhibition values and induction keys are patched: "paper" (at S2, and at S1 + 1, the
    # token the induction heads attend to from S2) or "all" positions.
    receiver_positions: str = "paper"
    # Optional screen of the path-patching steps: "atp" ranks every sender by |path attribution| (one
    # gradient pass) and path-patches exactly only the `screen_top` it ranks first, plus a random
    # sample of `screen_sample` others (what the screen may miss). None: every sender, exactly.
    screen: str | None = None
    screen_top: int = 24
    screen_sample: int = 12

    def __post_init__(self):
        if self.receiver_positions not in ("paper", "all"):
            raise InputError(f"receiver_positions is 'paper' or 'all', not {self.receiver_positions!r}")
        if self.screen not in (None, "atp"):
            raise InputError(f"screen is None (every sender exactly) or 'atp', not {self.screen!r}")
        if self.screen_top < 1 or self.screen_sample < 0:
            raise InputError(f"screen_top must be at least 1 and screen_sample at least 0; got {self.screen_top}, "
                             f"{self.screen_sample}")
        if self.n < 1:
            raise InputError(f"n (the number of IOI prompts) must be at least 1, not {self.n}")
        if not 1 <= self.n_path <= self.n:
            raise InputError(f"n_path must be between 1 and n ({self.n}); got {self.n_path}")
        if not 0 <= self.threshold <= 1:  # also refuses NaN: tau = threshold * F(M) must be a real cut
            raise InputError(f"threshold is a fraction of F(M) between 0 and 1, e.g. 0.01; got {self.threshold}")


def is_gpt2_small(model: HookedModel) -> bool:
    c = model.cfg
    return c.family == "gpt2" and (c.n_layers, c.n_heads, c.d_model) == (12, 12, 768)


@technique
def run_ioi(model: HookedModel, settings: Settings = Settings(), *, progress: bool = False,
            log: Callable[[str], None] = lambda text: None, stop_after: str | None = None, cluster=None) -> dict:
    """Run the study; returns what `mechscope ioi` writes to ioi.json. `stop_after="S-inhibition"`
    ends after step 3 and returns only {"model", "circuit" (found so far), "tau", "logit_diff",
    "seconds", "step_seconds", "partial"}: what a study that needs the S-inhibition heads needs.
    A `mechscope.distributed.Cluster` runs the path-patching sweeps of steps 3 to 5 and the knockouts
    (F(M), step 7) on its workers (the same numbers; each worker records its own shard's runs)."""
    if stop_after not in (None, "S-inhibition"):
        raise InputError(f"stop_after is None or 'S-inhibition', not {stop_after!r}")
    s = settings
    if cluster is not None and s.screen is not None:
        raise InputError("screen='atp' runs in one process; leave out the cluster (--workers) or the screen")
    start = time.perf_counter()
    timings: dict[str, float] = {}
    intermediate: dict[str, dict] = {}
    evidence: dict[str, dict] = {}
    circuit: dict[str, list[Head]] = {c: [] for c in CLASSES}
    unclassified: dict[str, dict] = {}

    def step(name: str):
        memory.release()  # what this step freed, before the next allocates
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 2)
        log(f"{name}: {timings[name]:.1f} s")

    def keep(result: Result, key: str) -> Result:
        intermediate[key] = result.to_dict()
        return result

    def classify(head: Head, cls: str, **facts) -> None:
        if s.max_per_class is not None and len(circuit[cls]) >= s.max_per_class:
            unclassified[head_name(head)] = {"step": f"{cls} (class full)", **facts}
            return
        circuit[cls].append(head)
        unclassified.pop(head_name(head), None)
        evidence[head_name(head)] = {"class": cls, **facts}

    def classified(head: Head) -> bool:
        return head_name(head) in evidence

    # 1. Data and F(M)
    records = ioi(s.n, seed=s.seed, model=model)
    batch = ContrastiveBatch.from_records(model, records)
    path_batch = ContrastiveBatch.from_records(model, records[: s.n_path])
    templates = sorted(set(batch.groups))
    reference = ContrastiveBatch.from_records(model, [
        r for i, t in enumerate(templates)
        for r in ioi(s.reference_per_template, seed=s.seed + 1000 + i, model=model, templates=[t])])
    knockouts = (Knockouts(model, batch, reference=reference, progress=progress) if cluster is None
                 else cluster.knockouts(batch, reference=reference))
    f_model = knockouts.model_logit_diff
    tau = s.threshold * max(abs(f_model), 1e-3)
    log(f"F(M) = {f_model:.3f} on {len(batch)} prompts; tau = {tau:.3f}")
    step("data and F(M)")

    # 2. Name movers: direct effect, attention to a name, OV copying
    positions = name_positions(batch)
    dla = keep(direct_logit_attribution(model, batch, chunk=8), "dla")
    attention = {k: keep(r, f"attention_end_to_{k}") for k, r in
                 attention_from_end(model, batch, {k: positions[k] for k in ("IO", "S1", "S2")}).items()}
    att_io, att_s = attention["IO"].values, attention["S1"].values + attention["S2"].values  # [layer, head]
    strong = [(l, h) for l, h in _heads(model) if abs(dla.values[l, h]) >= tau]
    copy = copy_scores(model, batch, {"IO": positions["IO"], "S1": positions["S1"]}, heads=strong) if strong else {}
    for kind, result in copy.items():
        keep(result, f"{kind}_score")
    for l, h in sorted(strong, key=lambda x: -abs(dla.values[x])):
        d, io, s_att = dla.values[l, h].item(), att_io[l, h].item(), att_s[l, h].item()
        cp, neg = copy["copy"].values[l, h].item(), copy["negative_copy"].values[l, h].item()
        facts = {"dla": d, "attention_io": io, "attention_s": s_att, "copy": cp, "negative_copy": neg}
        moves_io, moves_s = io >= s_att and io >= s.attention_min, s_att > io and s_att >= s.attention_min
        if d > 0 and ((moves_io and cp >= s.copy_min) or (moves_s and neg >= s.copy_min)):
            classify((l, h), "name_mover", mode="copies IO" if moves_io else "suppresses S", **facts)
        elif d < 0 and ((moves_io and neg >= s.copy_min) or (moves_s and cp >= s.copy_min)):
            classify((l, h), "negative_name_mover", mode="suppresses IO" if moves_io else "copies S", **facts)
        else:
            unclassified[head_name((l, h))] = {"step": "direct effect", **facts}
    step("name movers")

    # 3. S-inhibition: path patching into the name movers' queries at END
    detectors = {k: keep(r, f"{k}_score") for k, r in head_scores(model, seed=s.seed).items()}
    step("head detectors")
    movers = circuit["name_mover"]

    path_positions = name_positions(path_batch) if s.receiver_positions == "paper" else None
    # the clean and ABC runs every path-patching step reads (on a cluster, each worker its own)
    runs = record_runs(model, path_batch) if cluster is None else None

    def senders_into(heads: list[Head], receiver_input: str, where: str, key: str) -> list[tuple[Head, float]]:
        """Senders whose path effect through the inputs of `heads` at `where` is <= -tau."""
        receivers = sorted({_receiver(model, h, receiver_input) for h in heads})
        if not receivers or max(l for l, _ in receivers) == 0:
            return []
        at = _at(where, path_positions)
        names = ", ".join(_receiver_name(model, r, receiver_input) for r in receivers)
        log(f"path patching into the {receiver_input} of {names}")
        if cluster is None and s.screen == "atp":
            result = screened(receivers, receiver_input, at, key)
        elif cluster is None:
            result = path_patch(model, path_batch, receivers=receivers, receiver_input=receiver_input, at=at,
                                progress=progress, runs=runs)
        else:
            result = cluster.run(path_patch, path_batch, receivers=receivers, receiver_input=receiver_input, at=at,
                                 progress=progress)
        keep(result, key)
        found = [((l, h), result.values[l, h].item()) for l in range(result.values.shape[0])
                 for h in range(model.cfg.n_heads) if result.values[l, h] <= -tau]
        return sorted(found, key=lambda x: x[1])

    screens: dict[str, dict] = {}

    def screened(receivers: list[Head], receiver_input: str, at, key: str):
        """Path attribution ranks the senders; the top ones and a random sample of the rest are
        path-patched exactly (the others stay NaN: not classified)."""
        estimate = keep(path_attribution(model, path_batch, receivers=receivers, receiver_input=receiver_input,
                                         at=at, runs=runs), f"{key}_estimate")
        order = [(l, h) for l, h in _heads(model) if l < estimate.values.shape[0]]
        # By |estimate|, as AtP ranks: where a path's effect saturates (a key that moves a softmax), even the
        # sign of the linear estimate can be wrong (SmolLM2's previous-token head 16.0: +0.16 for -1.44)
        order.sort(key=lambda x: -abs(estimate.values[x].item()))
        top, rest = order[: s.screen_top], order[s.screen_top:]
        sample = sorted(random.Random(s.seed).sample(rest, min(s.screen_sample, len(rest))))
        result = path_patch(model, path_batch, receivers=receivers, receiver_input=receiver_input, at=at,
                            senders=top + sample, progress=progress, runs=runs)
        exact = {x: result.values[x].item() for x in top + sample}
        screens[key] = {
            "senders": len(order), "checked": len(top), "sampled": len(sample),
            "sampled_below_tau": [head_name(x) for x in sample if exact[x] <= -tau],  # what the ranking missed
            "sample_largest_effect": max((abs(exact[x]) for x in sample), default=0.0),
            "largest_estimate_error": max(abs(exact[x] - estimate.values[x].item()) for x in top + sample),
            "largest_unchecked_estimate": max((abs(estimate.values[x].item()) for x in rest if x not in sample),
                                              default=None),
        }
        log(f"screened {len(top)} + {len(sample)} sampled of {len(order)} senders; sampled below -tau: "
            f"{screens[key]['sampled_below_tau'] or 'none'}")
        return result

    for head, effect in senders_into(movers, "q", "END", "path_to_name_mover_queries"):
        if not classified(head):
            classify(head, "s_inhibition", path_effect=effect, attention_s2=attention["S2"].values[head].item())
    step("S-inhibition")
    if stop_after == "S-inhibition":
        return {"model": model.cfg.model_name, "circuit": {c: [head_name(h) for h in hs] for c, hs in circuit.items()},
                "tau": tau, "logit_diff": f_model, "seconds": round(time.perf_counter() - start, 2),
                "step_seconds": timings, "partial": stop_after}

    # 4. Induction and duplicate-token heads: path patching into the S-inhibition heads' values
    for head, effect in senders_into(circuit["s_inhibition"], "v", "S2", "path_to_s_inhibition_values"):
        if classified(head):
            continue
        ind, dup = detectors["induction"].values[head].item(), detectors["duplicate_token"].values[head].item()
        facts = {"path_effect": effect, "induction_score": ind, "duplicate_token_score": dup}
        if max(ind, dup) >= s.detector_min:
            classify(head, "induction" if ind >= dup else "duplicate_token", **facts)
        else:
            unclassified[head_name(head)] = {"step": "into S-inhibition values", **facts}
    step("induction and duplicate-token")

    # 5. Previous-token heads: path patching into the induction heads' keys
    for head, effect in senders_into(circuit["induction"], "k", "S1+1", "path_to_induction_keys"):
        if classified(head):
            continue
        prev = detectors["previous_token"].values[head].item()
        if prev >= s.detector_min:
            classify(head, "previous_token", path_effect=effect, previous_token_score=prev)
        else:
            unclassified[head_name(head)] = {"step": "into induction keys", "path_effect": effect,
                                             "previous_token_score": prev}
    step("previous-token")

    # 6. Backup name movers: DLA again with the name movers knocked out
    if movers:
        after = keep(_dla_knocked_out(model, batch, knockouts.heads - set(movers), knockouts.means),
                     "dla_without_name_movers")
        for l, h in sorted(_heads(model), key=lambda x: (dla.values[x] - after.values[x]).item()):
            gain = (after.values[l, h] - dla.values[l, h]).item()
            if gain >= tau and after.values[l, h] >= tau and not classified((l, h)):
                classify((l, h), "backup_name_mover", dla=dla.values[l, h].item(),
                         dla_without_name_movers=after.values[l, h].item(), gain=gain)
    step("backup name movers")

    # 7. For the report: the circuit's edges, each sender's path effect through each receiver alone; then
    #    the recorded path-patching runs are dropped (memory for the evaluation)
    edges = circuit_edges(model, path_batch, circuit, path_positions, runs=runs)
    runs = None
    step("edges")

    # 8. Evaluation
    classes = {c: heads for c, heads in circuit.items() if heads}
    found = [h for heads in classes.values() for h in heads]
    knockouts.remember(set(found))  # completeness and minimality start from the circuit's run
    (f_circuit,) = knockouts.logit_diffs([set(found)])
    complete = completeness(model, batch, classes, knockouts=knockouts) if classes else None
    minimal = minimality(model, batch, classes, knockouts=knockouts) if classes else {}
    knockouts.forget(set(found))  # its residual streams: the steps below do not read them
    step("evaluation")

    # 9. For the report: the residual stream patched per position on one template, and attention
    template = records[0]["template"]
    one = ContrastiveBatch.from_records(model, ioi(6, seed=s.seed + 7, model=model, templates=[template]))
    flow = activation_patch(model, one, site="resid_pre", per_position=True, progress=progress, memory_mb=256)
    where = {int(p[0]): k for k, p in name_positions(one).items()}
    tokens = [f"{t} ({where[i]})" if i in where else t for i, t in enumerate(model.to_str_tokens(one.clean_prompts[0]))]
    flow_data = flow.to_dict()
    flow_data["labels"]["pos"] = tokens[: len(flow.labels["pos"])]  # the tokens, names marked
    intermediate["resid_pre_by_position"] = {**flow_data, "prompts": list(one.clean_prompts)}
    patterns = attention_patterns(model, [r["clean"] for r in records[:4]])
    step("report data")

    n_heads = model.cfg.n_layers * model.cfg.n_heads
    out = {
        "model": model.cfg.model_name,
        "family": model.cfg.family,
        "n_prompts": len(batch),
        "n_path_prompts": len(path_batch),
        "seed": s.seed,
        "settings": asdict(s),
        "tau": tau,
        "logit_diff": f_model,
        "circuit": {c: [head_name(h) for h in heads] for c, heads in circuit.items()},
        "n_circuit_heads": len(found),
        "n_model_heads": n_heads,
        "circuit_logit_diff": f_circuit,
        "faithfulness": f_circuit / f_model if f_model else float("nan"),
        "completeness": None if complete is None else asdict(complete),
        "minimality": minimal,
        "evidence": evidence,
        "edges": edges,
        "unclassified": unclassified,
        "screen": screens or None,  # per path-patching step, with --screen atp
        "seconds": round(time.perf_counter() - start, 2),
        "step_seconds": timings,
        "prompts": records,
        "intermediate": intermediate,
        "attention_patterns": patterns,
    }
    if is_gpt2_small(model):
        out["paper_circuit"] = PAPER_GPT2
    return out


# The paths the study measures: (sender classes, receiver class, receiver input, position name).
PATHS = ((("s_inhibition",), "name_mover", "q", "END"),
         (("induction", "duplicate_token"), "s_inhibition", "v", "S2"),
         (("previous_token",), "induction", "k", "S1+1"))


def circuit_edges(model: HookedModel, batch: ContrastiveBatch, circuit: dict[str, list[Head]],
                  positions: dict[str, torch.Tensor] | None, runs=None) -> list[dict]:
    """For each path of the study and each receiver, every sender's path-patching effect through that
    receiver alone (GQA: its key/value head, shared with its group), at `_at(where, positions)`."""
    runs = runs if runs is not None else record_runs(model, batch)
    edges = []
    for sender_classes, receiver_class, receiver_input, where in PATHS:
        senders = [h for c in sender_classes for h in circuit[c]]
        receivers = {}  # the head patched -> the circuit heads it stands for
        for head in circuit[receiver_class]:
            receivers.setdefault(_receiver(model, head, receiver_input), []).append(head)
        for receiver, heads in receivers.items():
            before = [x for x in senders if x[0] < receiver[0]]
            if not before:
                continue
            result = path_patch(model, batch, receivers=[receiver], receiver_input=receiver_input,
                                at=_at(where, positions), senders=before, runs=runs)
            edges += [{"source": head_name(x), "target": head_name(r), "effect": result.values[x].item(),
                       "via": f"{receiver_input} of {head_name(receiver)}" + ("" if receiver_input == "q" else
                                                                               " (key/value head)")}
                      for x in before for r in heads]
    return edges


def _dla_knocked_out(model: HookedModel, batch: ContrastiveBatch, keep: set[Head], means: dict[str, torch.Tensor],
                     chunk: int = 8) -> Result:
    """Direct logit attribution with every head outside `keep` mean-ablated, `chunk` prompts at a time
    (each with its own prompts' means): the prompt-weighted mean of the parts'."""
    parts = []
    for first in range(0, len(batch), chunk):
        part = batch.rows(first, first + chunk)
        rows = {name: m[first:first + chunk] for name, m in means.items()}  # [part, pos, head, d_head]
        with model.hooks(fwd_hooks=knockout_hooks(model, keep, rows)):
            parts.append(direct_logit_attribution(model, part, chunk=chunk))
    return replace(parts[0], values=sum(p.values * p.n_prompts for p in parts) / len(batch),  # [layer, head]
                   n_prompts=len(batch), seconds=sum(p.seconds for p in parts))


def attention_patterns(model: HookedModel, prompts: list[str]) -> dict:
    """Every head's attention on a few prompts, compactly: {"tokens": per prompt, "shape": [prompt,
    layer, head, q, k], "uint8_base64": the weights times 255, rounded}."""
    tokens = model.to_tokens(prompts)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    pattern = torch.stack([cache["pattern", l] for l in range(model.cfg.n_layers)], 1)  # [prompt, layer, head, q, k]
    quantized = (pattern.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return {"tokens": [model.to_str_tokens(p) for p in prompts], "shape": list(quantized.shape),
            "uint8_base64": base64.b64encode(quantized.cpu().numpy().tobytes()).decode()}


def _heads(model: HookedModel) -> list[Head]:
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def _receiver(model: HookedModel, head: Head, receiver_input: str) -> Head:
    """The head whose `receiver_input` is patched for query head `head`: itself for "q", else the
    key/value head it reads (grouped-query attention shares them)."""
    if receiver_input == "q":
        return head
    return head[0], head[1] // (model.cfg.n_heads // model.cfg.n_kv_heads)


def _receiver_name(model: HookedModel, head: Head, receiver_input: str) -> str:
    """A receiver as the log shows it: a query head "L.H", or a key/value head with the query heads
    that read it ("kv L.K (L.H L.H ...)")."""
    if receiver_input == "q":
        return head_name(head)
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    reads = " ".join(head_name((head[0], head[1] * group + i)) for i in range(group))
    return f"kv head {head[0]}.{head[1]} (read by {reads})"


def _at(where: str, positions: dict[str, torch.Tensor] | None):
    """Where a receiver input is patched, for `path_patch(at=...)`: END is each prompt's read
    position; S2 and S1+1 are per prompt (the paper's), or every position when `positions` is None."""
    if where == "END":
        return "read"
    if positions is None:
        return "all"
    return positions["S2"] if where == "S2" else positions["S1"] + 1
