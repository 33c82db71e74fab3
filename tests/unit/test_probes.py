"""Probes: collection equals the cache, splits never leak a prompt, a probe finds a planted label and
its direction, shuffled labels give chance, metrics equal scikit-learn's, and each intervention
changes exactly the coordinate it names."""

import numpy as np
import pytest
import torch

from conftest import EXACT, tiny_model
from mechscope import InputError
from mechscope.probes import (Probe, ablate_direction, clamp, collect, fit_probe, interchange, probe_sweep,
                              random_subspace, split_by_group, steer)
from mechscope.probes.sweep import ProbeDataset

pytestmark = pytest.mark.usefixtures("no_grad")
SITES = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.2.mlp.hook_post", "hook_embed"]


def test_collected_rows_equal_the_cache(model, tokens):
    chosen = [[0, 3, 8], [2, 5]]
    acts = collect(model, tokens, SITES, positions=chosen, dtype="float64")
    _, cache = model.run_with_cache(tokens, names_filter=SITES)  # no hook_pattern: no switch to eager attention
    assert acts.prompt.tolist() == [0, 0, 0, 1, 1] and acts.position.tolist() == [0, 3, 8, 2, 5]
    for site in SITES:
        expected = torch.stack([cache[site][p, q] for p, q in zip(acts.prompt, acts.position)])
        torch.testing.assert_close(acts[site], expected, **EXACT)


def test_text_prompts_collect_only_real_positions(family):
    m = tiny_model(family)
    prompts = ["a cat", "the dog ran far away"]
    acts = collect(m, prompts, "blocks.0.hook_resid_post")
    lengths = (m.last_positions(prompts) + 1).tolist()
    assert acts.prompt.bincount().tolist() == lengths and len(acts) == sum(lengths)


def test_large_collections_spill_to_disk_and_stream_back(tmp_path, tokens):
    m = tiny_model("llama-gqa")
    kept = collect(m, tokens, SITES[:2], batch_size=1)
    spilled = collect(m, tokens, SITES[:2], batch_size=1, memory_mb=1e-3, folder=tmp_path)
    assert spilled.spilled and not kept.spilled and len(list(spilled.batches(SITES[0]))) == tokens.shape[0]
    for site in SITES[:2]:
        assert torch.equal(spilled[site], kept[site])
    folder = spilled.folder
    assert folder.parent == tmp_path and any(folder.iterdir())
    spilled.close()
    assert not folder.exists()
    with pytest.raises(InputError, match="closed"):
        spilled[SITES[0]]


def test_a_failed_collection_leaves_no_shards(tmp_path, tokens):
    m = tiny_model("gpt2")
    calls = []

    def boom(act, hook):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("interrupted")

    with m.hooks([("blocks.0.hook_resid_post", boom)]), pytest.raises(RuntimeError, match="interrupted"):
        collect(m, tokens, "blocks.1.hook_resid_post", batch_size=1, memory_mb=1e-3, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, message", [
    (dict(sites=[]), "no sites"), (dict(sites="blocks.0.attn.hook_pattern"), "not one vector per position"),
    (dict(dtype="int8"), "dtype must be"), (dict(positions=[[0], [99]]), "outside"),
    (dict(positions=[[], []]), "no positions chosen"), (dict(batch_size=0), "batch_size")])
def test_bad_collections_are_refused(tokens, bad, message):
    m = tiny_model("gpt2")
    with pytest.raises(InputError, match=message):
        collect(m, tokens, **{"sites": "hook_embed", **bad})


def test_split_keeps_each_prompt_on_one_side():
    groups = torch.arange(500) // 7
    train, test = split_by_group(groups, 0.25, seed=3)
    assert not set(groups[train].tolist()) & set(groups[test].tolist())
    assert (train | test).all() and 0.2 < test.double().mean() < 0.3
    again = split_by_group(groups, 0.25, seed=3)[1]
    assert torch.equal(test, again) and not torch.equal(test, split_by_group(groups, 0.25, seed=4)[1])
    with pytest.raises(InputError, match="at least 2"):
        split_by_group(torch.zeros(5), 0.2, 0)


def planted(n=20000, d=32, classes=2, scale=5.0, seed=0):
    """Gaussian rows with class k shifted by scale along its own random direction: (x, y, groups,
    class means)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, d, generator=g, dtype=torch.float64)
    means = scale * means / means.norm(dim=1, keepdim=True)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + means[y]
    return x, y, torch.arange(n) // 8, means


@pytest.mark.parametrize("kind", ["logistic", "ridge"])
def test_a_probe_recovers_a_planted_direction(kind):
    x, y, groups, means = planted()
    probe = fit_probe(x, y, groups=groups, kind=kind)
    assert probe.test_accuracy >= 0.99 and probe.train_accuracy >= 0.99
    truth = means[1] - means[0]
    assert torch.cosine_similarity(probe.direction, truth, dim=0) >= 0.99


def test_a_multiclass_probe_finds_each_class_direction():
    x, y, groups, means = planted(classes=4)
    centred = means - means.mean(0)  # softmax weights are defined up to a shared shift
    for kind, cosine in (("ridge", 0.99), ("logistic", 0.98)):  # logistic: nearly separable classes saturate
        probe = fit_probe(x, y, groups=groups, kind=kind)  # the softmax, which blurs the direction a little
        assert probe.test_accuracy >= 0.99 and probe.classes == [0, 1, 2, 3]
        assert (torch.cosine_similarity(probe.directions, centred, dim=1) >= cosine).all()


def test_shuffled_labels_give_chance():
    x, y, groups, _ = planted(classes=4)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    probe = fit_probe(x, shuffled, groups=groups)
    assert abs(probe.test_accuracy - 0.25) < 0.05 and abs(probe.chance - 0.25) < 0.05


def test_the_mlp_probe_learns_a_label_no_line_separates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g, dtype=torch.float64)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()  # XOR: a linear probe is at chance
    groups = torch.arange(3000) // 5
    assert fit_probe(x, y, groups=groups).test_accuracy < 0.6
    assert fit_probe(x, y, groups=groups, kind="mlp").test_accuracy > 0.9
    with pytest.raises(InputError, match="no direction"):
        fit_probe(x, y, groups=groups, kind="mlp").directions


def test_metrics_equal_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    x, y, groups, _ = planted(n=1500, classes=3, scale=1.2)  # overlapping classes: mistakes to count
    probe = fit_probe(x, y, groups=groups)
    test = split_by_group(groups, 0.2, 0)[1]
    predicted = probe.predict(x[test])
    p, r, f, support = precision_recall_fscore_support(y[test], predicted, zero_division=0)
    assert probe.confusion.tolist() == confusion_matrix(y[test], predicted).tolist()
    torch.testing.assert_close(torch.tensor([probe.precision, probe.recall, probe.f1], dtype=torch.float64),
                               torch.tensor(np.stack([p, r, f])), **EXACT)
    assert probe.support == support.tolist() and probe.test_accuracy == pytest.approx((predicted == y[test]).double().mean().item())


def test_logistic_probe_agrees_with_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    x, y, groups, _ = planted(n=2000, classes=3, scale=1.5)
    train, test = split_by_group(groups, 0.2, 0)
    ours = fit_probe(x, y, groups=groups, l2=1e-2)
    # The same objective: mean cross-entropy + l2/2 |W|^2 on standardized features <=> C = 1 / (l2 n).
    mean, std = x[train].mean(0), x[train].std(0)
    theirs = LogisticRegression(C=1 / (1e-2 * int(train.sum())), tol=1e-10, max_iter=10_000)
    theirs.fit(((x[train] - mean) / std).numpy(), y[train].numpy())
    agree = (ours.predict(x[test]).numpy() == theirs.predict(((x[test] - mean) / std).numpy())).mean()
    assert agree >= 0.995
    torch.testing.assert_close(ours.weight * std, torch.tensor(theirs.coef_), atol=1e-4, rtol=1e-3)


def test_a_probe_survives_save_and_load(tmp_path):
    x, y, groups, _ = planted(classes=3)
    for kind in ("logistic", "mlp"):
        probe = fit_probe(x, y, groups=groups, kind=kind, site="blocks.1.hook_resid_post", steps=50)
        again = Probe.load(probe.save(tmp_path / f"{kind}.safetensors"))
        assert torch.equal(again.predict(x), probe.predict(x)) and again.summary() == probe.summary()
    (tmp_path / "junk").write_bytes(b"not a probe")
    with pytest.raises(InputError, match="not a probe"):
        Probe.load(tmp_path / "junk")


# ---- interventions --------------------------------------------------------------------------------
SITE = "blocks.1.hook_resid_post"


def read(model, tokens, hooks, site=SITE):
    seen = {}
    with model.hooks(hooks + [(site, lambda a, h: seen.__setitem__("x", a.clone()))]):
        model(tokens)
    return seen["x"]


def test_each_intervention_changes_exactly_the_coordinate_it_names(model, tokens):
    d = model.cfg.d_model
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    x = read(model, tokens, [])
    along = lambda a: a @ u  # noqa: E731  [batch, pos]
    rest = lambda a: a - along(a)[..., None] * u  # noqa: E731
    stepped = read(model, tokens, [steer(SITE, 3 * u, 2.5, positions=[1, 4])])
    expected = along(x).clone()
    expected[:, [1, 4]] += 2.5
    torch.testing.assert_close(along(stepped), expected, **EXACT)
    torch.testing.assert_close(rest(stepped), rest(x), **EXACT)
    torch.testing.assert_close(along(read(model, tokens, [ablate_direction(SITE, u)])), torch.zeros_like(along(x)), **EXACT)
    clamped = read(model, tokens, [clamp(SITE, u, -4.0, positions=2)])
    assert torch.allclose(along(clamped)[:, 2], torch.full((2,), -4.0, dtype=torch.float64), **EXACT)
    torch.testing.assert_close(rest(clamped), rest(x), **EXACT)
    torch.testing.assert_close(clamped[:, 3:], x[:, 3:], **EXACT)


def test_interchange_takes_the_subspace_from_the_source(model, tokens):
    basis = random_subspace(model.cfg.d_model, 3, seed=1)  # [3, d]
    x = read(model, tokens, [])
    source = read(model, tokens.flip(0), [])
    swapped = read(model, tokens, [interchange(SITE, basis, source)])
    torch.testing.assert_close(swapped @ basis.T, source @ basis.T, **EXACT)
    complement = torch.eye(model.cfg.d_model, dtype=torch.float64) - basis.T @ basis
    torch.testing.assert_close(swapped @ complement, x @ complement, **EXACT)


def test_head_interventions_touch_one_head(tokens):
    m = tiny_model("llama-gqa")
    site = "blocks.0.attn.hook_z"
    u = torch.nn.functional.normalize(torch.ones(m.cfg.d_head, dtype=torch.float64), dim=0)
    z, steered = read(m, tokens, [], site), read(m, tokens, [steer(site, u, 1.0, head=2)], site)
    torch.testing.assert_close(steered[:, :, 2] @ u, z[:, :, 2] @ u + 1, **EXACT)
    torch.testing.assert_close(steered[:, :, [0, 1, 3]], z[:, :, [0, 1, 3]], **EXACT)
    with pytest.raises(InputError, match="say which with head="):
        m.run_with_hooks(tokens, fwd_hooks=[steer(site, u, 1.0)])


@pytest.mark.parametrize("bad, message", [(torch.zeros(64), "zero"), (torch.ones(2, 64), "dependent"),
                                          (torch.ones(3), "width 64")])
def test_bad_directions_are_refused(tokens, bad, message):
    m = tiny_model("gpt2")
    with pytest.raises(InputError, match=message):
        m.run_with_hooks(tokens, fwd_hooks=[ablate_direction(SITE, bad)])
    with pytest.raises(InputError, match="count from the prompt"):
        steer(SITE, torch.ones(64), 1.0, positions=[-1])


def test_a_probe_steers_its_own_site(tokens):
    m = tiny_model("gpt2")
    x, _ = torch.randn(200, 64, dtype=torch.float64), None
    y = (x[:, 0] > 0).long()
    probe = fit_probe(x, y, groups=torch.arange(200), site=SITE)
    name, fn = probe.steer(1, 2.0)
    assert name == SITE
    before, after = read(m, tokens, []), read(m, tokens, [(name, fn)])
    torch.testing.assert_close((after - before) @ probe.direction, torch.full((2, 9), 2.0, dtype=torch.float64), **EXACT)


# ---- the sweep and its controls -----------------------------------------------------------------------
def test_the_sweep_finds_a_label_the_model_carries_and_runs_its_controls():
    """The label is a property of the token (one of 16 ids, 8 of them labelled 1; 16 embeddings in 64
    dimensions are linearly separable): the model carries it, the shuffled labels do not, and the
    absolute position says nothing about it."""
    m = tiny_model("llama-gqa")
    torch.manual_seed(0)
    tokens = torch.randint(0, 16, (40, 12)) * 7  # 16 distinct ids
    dataset = ProbeDataset(tokens, (tokens % 2 == 0).long())
    result = probe_sweep(m, dataset, sites=["hook_embed", "blocks.2.hook_resid_post"])
    v = {metric: result.values[:, i] for i, metric in enumerate(result.labels["metric"])}
    assert result.labels["metric"] == ["accuracy", "train_accuracy", "chance", "position_baseline", "shuffled_labels",
                                       "random_init_control"]
    assert v["accuracy"][0] >= 0.95 and (v["shuffled_labels"] < 0.7).all() and (v["position_baseline"] < 0.7).all()
    assert v["random_init_control"][0] >= 0.95  # a random embedding separates 16 tokens too: what the control shows
    assert result.extra["best_site"] == "hook_embed"
    assert len(result.extra["direction_cosines"]) == 2


def test_a_reinitialized_model_is_fresh_and_seeded():
    m = tiny_model("gemma3")
    a, b, c = m.reinitialized(1), m.reinitialized(1), m.reinitialized(2)
    state = torch.get_rng_state()
    m.reinitialized(3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is untouched
    pa, pb, pc, pm = (dict(x.hf.named_parameters()) for x in (a, b, c, m))
    assert pa.keys() == pm.keys() and a.dtype == m.dtype and a.hook_names == m.hook_names
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(pa[w], pb[w]) and not torch.equal(pa[w], pc[w]) and not torch.equal(pa[w], pm[w])


def test_collect_checks_memory_per_batch_not_for_the_whole_dataset(monkeypatch):
    """A dataset whose logits would not fit at once is collected batch by batch (and never unembedded).
    The memory check is made to refuse anything above 16 prompts (real checks start at 256 MiB)."""
    from mechscope.models import hooked

    def at_most_16_prompts(shape, d_vocab, dtype, device):
        if shape[0] > 16:
            raise InputError(f"{shape[0]} prompts need too much memory")

    monkeypatch.setattr(hooked, "check_fits_in_memory", at_most_16_prompts)
    m = tiny_model("gpt2")
    tokens = torch.randint(0, 256, (64, 16))
    with pytest.raises(InputError, match="64 prompts need too much memory"):
        m(tokens)
    assert len(collect(m, tokens, "blocks.0.hook_resid_post", batch_size=8)) == 64 * 16
