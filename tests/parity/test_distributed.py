"""Ray workers give the numbers of one process: a local cluster of 2 workers, each loading a tiny
float64 grouped-query model (one token per word) from a directory, as a user's spec would, against
the same technique run once on the whole batch of IOI prompts of mixed lengths.

Tolerance 1e-6, the issue's: exact patching agrees to ~1e-16; gradient techniques to ~1e-7,
because Hugging Face's RMSNorm computes in float32 even in a float64 model, and the backward of a
mean over 3 prompts carries 1/3 (rounded in float32) where one over 2 or 4 carries an exact power
of two."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

from conftest import saved_ioi_model
from mechscope import load_model
from mechscope.discovery import discover
from mechscope.errors import DistributedError, InputError
from mechscope.patching import activation_patch, attribution_patch, path_patch
from mechscope.studies import Settings, run_ioi
from mechscope.tasks import ContrastiveBatch, ioi
from mechscope.tasks.ioi import name_positions

ray = pytest.importorskip("ray")
from mechscope.distributed import Cluster, run  # noqa: E402

TOL = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_ioi_model(tmp_path_factory.mktemp("llama-gqa"), layers=6)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype="float64")


@pytest.fixture(scope="module")
def batch(model):
    """7 IOI prompts of mixed lengths: 4 shards of 1 or 2 prompts."""
    batch = ContrastiveBatch.from_records(model, ioi(7, seed=0, model=model))
    assert not batch.equal_lengths
    return batch


@pytest.fixture(scope="module")
def cluster(model_dir):
    with Cluster(model_dir, workers=2, dtype="float64") as c:
        yield c


def assert_same(one, many):
    assert type(one) is type(many) and one.axes == many.axes and one.labels == many.labels
    assert many.n_prompts == one.n_prompts and many.values.dtype == one.values.dtype
    torch.testing.assert_close(many.values, one.values, rtol=0, atol=TOL, equal_nan=True)
    for key in ("clean_metric", "corrupt_metric"):
        if hasattr(one, key):
            assert getattr(many, key) == pytest.approx(getattr(one, key), abs=TOL)


@pytest.mark.parametrize("site, per_position", [("head_z", True), ("resid_pre", True), ("head_k", False)])
def test_exact_patching_equals_one_process(cluster, model, batch, site, per_position):
    one = activation_patch(model, batch, site=site, per_position=per_position)
    many = cluster.run(activation_patch, batch, site=site, per_position=per_position)
    assert_same(one, many)
    assert many.extra["workers"] == 2 and many.extra["shards"] == 4 and many.extra["retried"] == 0


def test_path_patching_with_positions_per_prompt(cluster, model, batch):
    """`at` has one position per prompt: each shard gets its own prompts' positions."""
    at = name_positions(batch)["S2"]
    one = path_patch(model, batch, receivers=[(5, 0)], receiver_input="v", at=at)
    many = cluster.run(path_patch, batch, receivers=[(5, 0)], receiver_input="v", at=at, shards=3)
    assert_same(one, many)


def test_the_ioi_study_finds_the_same_circuit(cluster, model):
    """Its path-patching sweeps on the workers: the same effects, so the same circuit."""
    loose = Settings(n=8, n_path=5, threshold=0.0, attention_min=0.0, copy_min=0.0, detector_min=0.0,
                     reference_per_template=2, max_per_class=2)  # every class filled on a random model
    one, many = run_ioi(model, loose), run_ioi(model, loose, cluster=cluster)
    assert many["circuit"] == one["circuit"] and many["edges"] == one["edges"]
    for key in ("logit_diff", "circuit_logit_diff", "faithfulness"):  # the knockouts ran on the workers too
        assert many[key] == pytest.approx(one[key], abs=TOL)
    assert many["completeness"]["removed"] == one["completeness"]["removed"]
    paths = [k for k in one["intermediate"] if k.startswith("path_to_")]
    assert len(paths) == 3, paths  # every sweep ran: each class was filled
    for key in paths:
        torch.testing.assert_close(torch.tensor(many["intermediate"][key]["values"]),
                                   torch.tensor(one["intermediate"][key]["values"]), rtol=0, atol=TOL)


def test_attribution_and_graddrop_equal_one_process(cluster, model, batch):
    one = attribution_patch(model, batch, sites=["head_z", "head_q"], method="atp*")
    many = cluster.run(attribution_patch, batch, sites=["head_z", "head_q"], method="atp*")
    for site in one:
        assert_same(one[site], many[site])
        # GradDrop sums magnitudes of means, so it is formed again from the combined per-layer means
        torch.testing.assert_close(torch.tensor(many[site].extra["graddrop"]), torch.tensor(one[site].extra["graddrop"]),
                                   rtol=0, atol=TOL)
        assert "graddrop_layers" not in many[site].extra  # kept only when asked for


@pytest.mark.parametrize("method", ["eap-ig", "exact"])
def test_edge_scores_equal_one_process(cluster, model, batch, method):
    from mechscope.discovery import Graph

    graph = Graph.from_model(model, layers=[-2, -1] if method == "exact" else None)  # exact: one run per edge
    one = discover(model, batch, method=method, graph=graph, ablation="zero" if method == "exact" else "corrupt")
    many = cluster.run(discover, batch, method=method, graph=graph, ablation=one.ablation)
    assert_same(one, many)
    for key in ("clean_metric", "empty_metric"):
        assert many.extra[key] == pytest.approx(one.extra[key], abs=TOL)


def _dies_once(marker):
    """A technique whose first call, in whichever worker, kills that worker's process outright."""
    def technique(model, batch, **kwargs):
        try:
            marker.open("x").close()
        except FileExistsError:
            return activation_patch(model, batch, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return technique


def test_a_killed_worker_loses_no_shard(cluster, model, batch, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's technique travels by value
    before = list(cluster.pids)
    many = cluster.run(_dies_once(tmp_path / "died"), batch, site="head_v")
    assert (tmp_path / "died").exists() and many.extra["retried"] == 1
    assert len(set(cluster.pids) - set(before)) == 1  # one worker was replaced
    assert_same(activation_patch(model, batch, site="head_v"), many)


def test_a_technique_error_is_itself(cluster, batch):
    with pytest.raises(InputError, match="unknown"):
        cluster.run(activation_patch, batch, site="nonsense")


def test_what_depends_on_the_whole_batch_is_refused_before_any_work(batch):
    for kwargs, match in [(dict(method="acdc", threshold=0.1), "ACDC"), (dict(method="eap", ablation="mean"), "mean"),
                          (dict(runs=object()), "PathRuns")]:
        with pytest.raises(InputError, match=match):
            run(discover, batch, model="/nonexistent", workers=2, **kwargs)


def test_bad_addresses_and_missing_ray(monkeypatch, cluster, model_dir):
    from mechscope.distributed.cluster import _check_address

    with pytest.raises(DistributedError, match="not host:port"):
        Cluster(model_dir, address="nonsense")
    with pytest.raises(DistributedError, match="no Ray cluster answers at 127.0.0.1:1"):
        _check_address("127.0.0.1:1")  # (this process is connected to the cluster fixture's instance)
    with pytest.raises(DistributedError, match="already connected to the Ray instance at .*, not 127.0.0.1:1"):
        Cluster(model_dir, address="127.0.0.1:1")  # refused, not silently ignored
    with pytest.raises(InputError, match="workers must be a positive integer"):
        Cluster(model_dir, workers=0)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DistributedError, match=r"pip install 'mechscope\[distributed\]'"):
        Cluster(model_dir, workers=2)


def test_probe_collection_gives_the_same_rows(cluster, model, batch):
    """Texts of mixed lengths, every real position and then chosen positions (a mask): the same rows
    in the same order, prompts numbered in the whole set."""
    from mechscope.probes import collect

    texts = list(batch.clean_prompts)
    sites = ["blocks.1.hook_resid_post", "blocks.3.attn.hook_z"]
    chosen = torch.zeros(batch.clean.shape, dtype=torch.bool)
    chosen[torch.arange(len(texts)), batch.read_pos] = True
    chosen[2] = False  # a prompt with no row
    for positions in (None, chosen):
        one = collect(model, texts, sites, positions=positions)
        many = cluster.collect(texts, sites, positions=positions, shards=3)
        assert torch.equal(many.prompt, one.prompt) and torch.equal(many.position, one.position)
        for site in sites:
            torch.testing.assert_close(many[site], one[site], rtol=0, atol=TOL)


def test_knockouts_equal_one_process_and_survive_a_dead_worker(cluster, model, batch):
    """Each worker keeps its shard's Knockouts; a killed worker's shard is rebuilt and its
    remembered runs replayed."""
    from mechscope.analysis.circuit import Knockouts, completeness, minimality

    # No reference: each template's mean over the batch's own corrupt prompts, the whole batch's on every shard
    one, many = Knockouts(model, batch), cluster.knockouts(batch)
    assert many.model_logit_diff == pytest.approx(one.model_logit_diff, abs=TOL) and many.heads == one.heads
    for name in one.means:
        torch.testing.assert_close(many.means[name], one.means[name], rtol=0, atol=TOL)
    classes = {"early": [(0, 1), (1, 2)], "late": [(4, 0), (5, 3)]}
    keeps = [{(0, 1), (4, 0)}, one.heads - {(5, 3)}, set()]
    assert many.logit_diffs(keeps) == pytest.approx(one.logit_diffs(keeps), abs=TOL)
    many.remember({(0, 1), (1, 2), (4, 0), (5, 3)})
    dead = cluster.pids[1]
    os.kill(dead, signal.SIGKILL)  # the second shard's worker, with its remembered run
    c1, c2 = completeness(model, batch, classes, knockouts=many), completeness(model, batch, classes, knockouts=one)
    assert c1.removed == c2.removed and c1.gap == pytest.approx(c2.gap, abs=TOL)
    assert dead not in cluster.pids  # it was replaced (its remembered runs replayed: they save time, not change values)
    m1, m2 = minimality(model, batch, classes, knockouts=many), minimality(model, batch, classes, knockouts=one)
    assert m1.keys() == m2.keys() and all(m1[h]["score"] == pytest.approx(m2[h]["score"], abs=TOL) for h in m1)


def test_a_second_driver_joins_by_address(cluster, model_dir):
    """Another process joins this Ray instance by its address (the path of an existing cluster):
    Ray answers, and the CPUs this cluster's workers hold are said to be busy, not waited for."""
    import subprocess

    address = ray.get_runtime_context().gcs_address
    code = f"from mechscope.distributed import Cluster; Cluster({str(model_dir)!r}, workers=1, address={address!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "1 workers need 1 CPUs and Ray has 0 free" in done.stderr, done.stderr[-2000:]
