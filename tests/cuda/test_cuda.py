"""The CUDA tier: on a GPU, the wrapped model, patching, attribution, probes, generation and the
studies give what they give on the CPU (tiny float64 models, so only the kernels' rounding differs).
Skipped where no GPU is present; CI has none, so this tier runs where a GPU is lent:

    pytest -m cuda tests/cuda
"""

import os

import pytest
import torch

from conftest import EXACT, bpe_word_model, ioi_model, tiny_batch, tiny_model

# MECHSCOPE_CUDA_TIER_DEVICE=cpu dry-runs the tier's logic on a machine without a GPU.
DEVICE = os.environ.get("MECHSCOPE_CUDA_TIER_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("no_grad"),
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]


def on_cuda(model):
    import copy

    from mechscope import HookedModel

    return HookedModel(copy.deepcopy(model.hf).to(DEVICE), model.tokenizer)


def device_tol(model, *, eager: bool = False) -> dict:
    """EXACT where the whole forward runs in float64 (GPT-2, without eager attention). Elsewhere Hugging
    Face rounds to float32 inside the float64 model (rotary angles, RMSNorm, eager softmax), and the two
    devices' float32 kernels round differently (1 ulp, about 1e-7 of values of order 1), which three
    layers carry on: measured up to 1.2e-6 absolute (7.6e-6 relative) on an H100, so ten times
    float32's tolerance."""
    if model.cfg.family == "gpt2" and not eager:
        return EXACT
    return dict(atol=1e-5, rtol=1e-5)


def close(a, b, tol):
    torch.testing.assert_close(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu(), **tol)


def test_logits_and_every_cached_site_match_the_cpu(family, tokens):
    cpu = tiny_model(family)
    gpu = on_cuda(cpu)
    assert gpu.device.type == DEVICE
    tol = device_tol(cpu, eager=True)  # the cache hooks patterns: eager attention on both
    logits, cache = cpu.run_with_cache(tokens)
    g_logits, g_cache = gpu.run_with_cache(tokens)
    close(g_logits, logits, tol)
    assert set(g_cache.keys()) == set(cache.keys())
    for name in cache.keys():
        close(g_cache[name], cache[name], tol)


def test_patching_and_attribution_match_the_cpu(family):
    from mechscope.patching import activation_patch, attribution_patch

    cpu = tiny_model(family)
    gpu = on_cuda(cpu)
    tol = device_tol(cpu)
    for site in ("head_z", "resid_pre"):
        close(activation_patch(gpu, tiny_batch(gpu), site=site, per_position=True).values,
              activation_patch(cpu, tiny_batch(cpu), site=site, per_position=True).values, tol)
    with torch.enable_grad():
        close(attribution_patch(gpu, tiny_batch(gpu), sites=["head_z"])["head_z"].values,
              attribution_patch(cpu, tiny_batch(cpu), sites=["head_z"])["head_z"].values, tol)


def test_generation_with_a_steer_matches_the_cpu(family, tokens):
    from mechscope.probes import steer

    cpu = tiny_model(family)
    gpu = on_cuda(cpu)
    u = torch.nn.functional.normalize(torch.ones(cpu.cfg.d_model, dtype=torch.float64), dim=0)
    hooks = [steer("blocks.0.hook_resid_post", u, 5.0, positions=[1, 6])]
    assert torch.equal(gpu.generate(tokens[:, :5], max_new_tokens=5, fwd_hooks=hooks).cpu(),
                       cpu.generate(tokens[:, :5], max_new_tokens=5, fwd_hooks=hooks))


def test_collected_activations_and_probes_match_the_cpu(tokens):
    from mechscope.probes import collect, fit_probe

    cpu = tiny_model("llama-gqa")
    gpu = on_cuda(cpu)
    site = "blocks.2.hook_resid_post"
    a, b = collect(cpu, tokens, site, dtype="float64"), collect(gpu, tokens, site, dtype="float64")
    close(b[site], a[site], device_tol(cpu))
    labels = (tokens.flatten() % 2)
    pa = fit_probe(a[site], labels, groups=a.prompt * 9 + a.position // 3)
    pb = fit_probe(b[site], labels, groups=b.prompt * 9 + b.position // 3)
    assert pa.confusion.tolist() == pb.confusion.tolist()


def test_the_studies_match_the_cpu():
    from mechscope.studies import Settings, run_ioi
    from mechscope.studies.positions import PositionSettings, run_positions

    cpu = ioi_model("llama-gqa", layers=4)
    loose = Settings(n=8, n_path=4, threshold=0.0, attention_min=0.0, copy_min=0.0, detector_min=0.0,
                     reference_per_template=2, max_per_class=2)
    a, b = run_ioi(cpu, loose), run_ioi(on_cuda(cpu), loose)
    assert a["circuit"] == b["circuit"]
    for key in ("logit_diff", "circuit_logit_diff"):  # (their ratio, faithfulness, has a random model's tiny F(M) below)
        assert b[key] == pytest.approx(a[key], abs=1e-5)
    words = bpe_word_model()
    s = PositionSettings(n=16, n_words=4, n_ioi=4)
    p, q = run_positions(words, s, heads=["2.1"]), run_positions(on_cuda(words), s, heads=["2.1"])
    assert q["accuracy"] == pytest.approx(p["accuracy"], abs=1e-6)
    assert q["causal"]["cross_template_effect"] == pytest.approx(p["causal"]["cross_template_effect"], abs=1e-6)


def test_edge_discovery_matches_the_cpu(family):
    """EAP, EAP-IG, ACDC, edge patching (masks made on the CPU) and a circuit's faithfulness curve."""
    from mechscope.discovery import EdgePatcher, Evaluator, Graph, discover

    cpu = tiny_model(family)
    gpu = on_cuda(cpu)
    tol = device_tol(cpu)
    for method in ("eap", "eap-ig", "acdc"):
        with torch.enable_grad():
            a = discover(cpu, tiny_batch(cpu), method=method, steps=3, threshold=0.01)
            b = discover(gpu, tiny_batch(gpu), method=method, steps=3, threshold=0.01)
        close(b.values, a.values, tol)
        if method == "acdc":
            assert b.circuit_edges == a.circuit_edges
    graph = Graph.from_model(cpu)
    masks = torch.rand(5, graph.n_edges, generator=torch.Generator().manual_seed(0)) < 0.3  # [variant, edge]
    for ablation in ("corrupt", "mean"):
        a = EdgePatcher(cpu, graph, tiny_batch(cpu), ablation=ablation).run(masks)
        b = EdgePatcher(gpu, graph, tiny_batch(gpu), ablation=ablation).run(masks)
        close(b, a, tol)
    ca, cb = Evaluator(cpu, tiny_batch(cpu), graph), Evaluator(gpu, tiny_batch(gpu), graph)
    scores = discover(cpu, tiny_batch(cpu), method="eap")
    close(cb.curve(scores, sizes=[1, 10, 40])["faithfulness"], ca.curve(scores, sizes=[1, 10, 40])["faithfulness"], tol)


def test_a_model_split_over_the_gpu_and_the_cpu_matches_the_cpu(tmp_path):
    """accelerate's device map, the first layers on the GPU and the rest on the CPU (dry run: the
    rest on disk): every technique's tensors cross devices between layers, and hooks write where
    the module that reads them lives."""
    from conftest import saved_ioi_model
    from mechscope import load_model
    from mechscope.analysis.dla import direct_logit_attribution
    from mechscope.discovery import discover
    from mechscope.patching import activation_patch, attribution_patch, path_patch
    from mechscope.tasks import ContrastiveBatch, ioi

    folder = saved_ioi_model(tmp_path / "m", layers=4)
    cpu = load_model(folder, dtype="float64")
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    cap = size(cpu.hf.model.embed_tokens) + 3 * size(cpu.hf.model.layers[0])  # the embedding and two layers
    memory = {0: cap, "cpu": 2**34} if DEVICE == "cuda" else {"cpu": cap}
    split = load_model(folder, dtype="float64", device="auto", max_memory=memory, offload_folder=tmp_path / "off")
    assert len(set(split.hf.hf_device_map.values())) >= 2, split.hf.hf_device_map
    batch = ContrastiveBatch.from_records(cpu, ioi(5, seed=0, model=cpu))
    tol = device_tol(cpu)
    a, ca = cpu.run_with_cache(batch.clean)
    b, cb = split.run_with_cache(batch.clean)
    close(b, a, tol)
    for name in ca.keys():
        close(cb[name], ca[name], tol)
    with torch.enable_grad():
        for fn in (lambda m: activation_patch(m, batch, site="head_z", per_position=True),
                   lambda m: attribution_patch(m, batch, sites=["head_k"], method="atp*")["head_k"],
                   lambda m: path_patch(m, batch), lambda m: direct_logit_attribution(m, batch),
                   lambda m: discover(m, batch, method="eap-ig")):
            close(fn(split).values, fn(cpu).values, tol)


def test_a_ray_worker_on_the_gpu_matches_the_cpu(tmp_path):
    """mechscope.distributed with gpus_per_worker=1: the worker loads the model on its GPU."""
    pytest.importorskip("ray")
    from conftest import saved_ioi_model
    from mechscope import load_model
    from mechscope.distributed import Cluster
    from mechscope.patching import activation_patch
    from mechscope.tasks import ContrastiveBatch, ioi

    folder = saved_ioi_model(tmp_path / "m", layers=4)
    cpu = load_model(folder, dtype="float64")
    batch = ContrastiveBatch.from_records(cpu, ioi(6, seed=0, model=cpu))
    with Cluster(folder, workers=1, dtype="float64", device=DEVICE, gpus_per_worker=int(DEVICE == "cuda")) as cluster:
        result = cluster.run(activation_patch, batch, site="head_z", shards=2)
    close(result.values, activation_patch(cpu, batch, site="head_z").values, device_tol(cpu))


def test_othello_evaluation_probes_and_interventions_match_the_cpu():
    """The shipped Othello-GPT on the device (float32: the kernels round differently, so rates agree
    to a position or two, not bit for bit): legal-move rate, probe accuracy by layer, interventions."""
    from mechscope.organisms.othello import random_games
    from mechscope.organisms.othello.probe import intervene, load, probe_layers
    from mechscope.organisms.othello.train import evaluate

    cpu, dev = load(6), load(6, device=DEVICE)
    assert dev.device.type == torch.device(DEVICE).type
    games = random_games(200, seed=5)
    assert evaluate(dev.hf, games)["top1_legal"] == pytest.approx(evaluate(cpu.hf, games)["top1_legal"], abs=2e-3)
    (out_c, probes_c, acts_c), (out_d, probes_d, acts_d) = (probe_layers(m, games, controls=False) for m in (cpu, dev))
    close(out_d["mine_theirs"], out_c["mine_theirs"], dict(atol=0.01, rtol=0))
    edits = [intervene(m, random_games(60, seed=6), p, games, a, start=4, n=20) for m, p, a in
             ((cpu, probes_c, acts_c), (dev, probes_d, acts_d))]
    assert edits[1]["n_cases"] == edits[0]["n_cases"] == 20
    assert edits[1]["intervention_success"] == pytest.approx(edits[0]["intervention_success"], abs=0.1)
