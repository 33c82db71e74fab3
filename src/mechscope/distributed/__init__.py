"""Beyond one process: a technique's prompts spread over Ray workers, each holding its own model,
with the same numbers as one process.

    from mechscope.distributed import Cluster
    with Cluster("smollm2-135m", workers=4) as cluster:           # or address="auto" / "host:port"
        result = cluster.run(activation_patch, batch, site="head_z")
        scores = cluster.run(discover, batch, method="eap-ig")
        acts = cluster.collect(texts, "blocks.5.hook_resid_post")   # probe activations, rows in order

Any technique whose result is a mean over prompts splits: exact, attribution and path patching,
and EAP, EAP-IG and exact edge scores; probe activations are collected by shard and joined. Ray is
an optional dependency: pip install 'mechscope[distributed]'.
"""

from mechscope.distributed.cluster import Cluster, run

__all__ = ["Cluster", "run"]
