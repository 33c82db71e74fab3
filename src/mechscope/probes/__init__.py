"""Linear probes and interventions: read a variable out of activations, then change it.

    acts = collect(model, prompts, "blocks.6.hook_resid_post", positions=where)
    probe = fit_probe(acts["blocks.6.hook_resid_post"], labels, groups=acts.prompt, site="blocks.6.hook_resid_post")
    model.generate(prompt, max_new_tokens=20, fwd_hooks=[probe.steer(3, alpha=8.0)])
"""

from mechscope.probes.collect import Activations, collect
from mechscope.probes.fit import KINDS, Probe, cosine_similarities, fit_probe, split_by_group
from mechscope.probes.interventions import ablate_direction, clamp, interchange, random_subspace, steer
from mechscope.probes.sweep import probe_sweep

__all__ = ["Activations", "KINDS", "Probe", "ablate_direction", "clamp", "collect", "cosine_similarities",
           "fit_probe", "interchange", "probe_sweep", "random_subspace", "split_by_group", "steer"]
