"""Edge patching and edge attribution against references written plainly, on every family.

The literal reference ablates one edge w -> r with nothing but hook names: a first run writes the
reader's layer input minus w's (clean - corrupt) difference and records what r computes from it (a
head's q, k or v; an MLP's hidden activation); a second, clean run puts exactly that into r."""

import pytest
import torch
from torch import nn

from conftest import ALL_FAMILIES, byte_tokenizer, exact_for, tiny_batch, tiny_hf
from mechscope import HookedModel
from mechscope.discovery import Evaluator, Graph, discover
from mechscope.metrics import logit_diff, read_logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _writer_deltas(model, batch):
    names = lambda n: n.endswith(("hook_result", "hook_mlp_out")) or n == "blocks.0.hook_resid_pre"
    with torch.no_grad():
        _, clean = model.run_with_cache(batch.clean, names_filter=names)
        _, corrupt = model.run_with_cache(batch.corrupt, names_filter=names)

    def delta(writer: str):
        if writer == "input":
            name, head = "blocks.0.hook_resid_pre", None
        elif writer.startswith("m"):
            name, head = f"blocks.{writer[1:]}.hook_mlp_out", None
        else:
            layer, h = writer[1:].split(".h")
            name, head = f"blocks.{layer}.attn.hook_result", int(h)
        d = clean[name] - corrupt[name]
        return d if head is None else d[:, :, head]
    return delta


def literal_edge_effect(model, batch, edge: str, delta) -> float:
    """metric(clean run with edge ablated) - metric(clean run), by hooks alone."""
    writer, reader = edge.split("->")
    d = delta(writer)  # [batch, pos, d_model]
    n_layers = model.cfg.n_layers
    clean_ld = logit_diff(read_logits(model(batch.clean), batch), batch).mean()
    minus = lambda act, hook: act - d
    if reader == "logits":
        hooks = [(f"blocks.{n_layers - 1}.hook_resid_post", minus)]
    else:
        node, kind = (reader.split("<") + ["mlp"])[:2]
        if kind == "mlp":
            layer = int(node[1:])
            site = f"blocks.{layer}.mlp.hook_post"
            if site not in model.hook_names:  # a mixture of experts: what the block adds
                site = f"blocks.{layer}.hook_mlp_out"
            into = f"blocks.{layer}.hook_resid_pre" if model.cfg.parallel_residual else f"blocks.{layer}.hook_resid_mid"
            head = None
        else:
            layer, head = (int(x) for x in node[1:].replace(".kv", ".h").split(".h"))
            site, into = f"blocks.{layer}.attn.hook_{kind}", f"blocks.{layer}.hook_resid_pre"
        seen = {}
        model.run_with_hooks(batch.clean, fwd_hooks=[(into, minus), (site, lambda act, hook: seen.setdefault("a", act.clone()))])

        def put(act, hook):
            out = act.clone()
            if head is None:
                return seen["a"]
            out[:, :, head] = seen["a"][:, :, head]
            return out
        hooks = [(site, put)]
    logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
    return (logit_diff(read_logits(logits, batch), batch).mean() - clean_ld).item()


@pytest.mark.usefixtures("no_grad")
def test_edge_patching_equals_literal_reference(model):
    batch = tiny_batch(model)
    graph = Graph.from_model(model)
    delta = _writer_deltas(model, batch)
    exact = discover(model, batch, method="exact", graph=graph)
    step = 3  # every third edge: every kind of reader and writer, a third of the forwards
    for i in range(0, graph.n_edges, step):
        name = graph.edge_names[i]
        ref = literal_edge_effect(model, batch, name, delta)
        assert exact.values[i].item() == pytest.approx(ref, abs=1e-5 * (1 + abs(ref))), name


@pytest.mark.usefixtures("no_grad")
def test_runs_resumed_from_a_reference_equal_runs_from_the_clean_run(model):
    """`run(masks, reference=)` resumes where a mask first differs from the reference's, from that
    run's stream and writer differences: the same logits as the run from the clean recording, for
    masks that differ late, early, by fewer ablations, or not at all, with most edges ablated (the
    complement path) or few."""
    batch = tiny_batch(model)
    p = Evaluator(model, batch, Graph.from_model(model)).patcher
    g = p.graph
    into = g.edges[:, 1]  # [n_edges]: reader indices
    late = torch.tensor([g.readers[int(r)].name == "logits" for r in into])  # edges into the logits
    early = torch.tensor([g.readers[int(r)].stage == g.readers[0].stage for r in into])  # into layer 0
    torch.manual_seed(0)
    for share in (0.9, 0.2):
        ref_mask = torch.rand(g.n_edges) < share  # [n_edges], 1 = ablated
        ref = p.reference(ref_mask)
        masks = ref_mask.repeat(5, 1)  # [variants, n_edges]
        masks[1, (late & ~ref_mask).nonzero()[-1:]] = True  # one more edge, late (if one is kept)
        masks[2, late.nonzero()[-1]] = ~masks[2, late.nonzero()[-1]]  # one edge flipped, late
        masks[3, early] = ~masks[3, early]  # early edges flipped: resumes at layer 0
        masks[4, late & ref_mask] = False  # fewer ablations than the reference
        plain = p.run(masks)  # [variants, batch, d_vocab]
        for i in range(5):  # one at a time: a chunk resumes where its earliest row differs
            torch.testing.assert_close(p.run(masks[i:i + 1], ref), plain[i:i + 1], **exact_for(model))
        torch.testing.assert_close(p.run(masks[[0, 1, 2, 4]], ref), plain[[0, 1, 2, 4]], **exact_for(model))
        changed = [not torch.allclose(plain[i], plain[0]) for i in range(1, 5)]
        # (with 90% ablated, most writers' outputs are their ablated ones, or reach nothing kept)
        assert all(changed) if share < 0.5 else any(changed)


def test_eap_is_the_gradient_of_the_edge_mask(model):
    """EAP's score of an edge is d metric / d m_e at m = 0, where m_e ablates a fraction m_e of it."""
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    eap = discover(model, batch, method="eap", evaluator=ev)
    mask = torch.zeros(1, ev.graph.n_edges, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        value = logit_diff(ev.patcher.run(mask), batch).mean()
        grad, = torch.autograd.grad(value, mask)
    torch.testing.assert_close(eap.values, grad[0], **exact_for(model))
    ig1 = discover(model, batch, method="eap-ig", steps=1, evaluator=ev)
    torch.testing.assert_close(ig1.values, eap.values, atol=0, rtol=0)
    # The clean recording as the gradient pass: the same scores, for EAP and EAP-IG's last point
    shared = Evaluator(model, batch, ev.graph, gradients=True)
    assert shared.patcher.clean_grads is not None
    torch.testing.assert_close(discover(model, batch, method="eap", evaluator=shared).values, eap.values,
                               **exact_for(model))
    assert shared.patcher.clean_grads is None  # used once, then freed
    ig3 = discover(model, batch, method="eap-ig", steps=3, evaluator=ev)
    again = Evaluator(model, batch, ev.graph, gradients=True)
    torch.testing.assert_close(discover(model, batch, method="eap-ig", steps=3, evaluator=again).values, ig3.values,
                               **exact_for(model))


def test_eap_ig_heads_summed_over_steps_equal_autograd_per_step(model, monkeypatch):
    """EAP-IG sums a head's gradient over steps in d_head space and carries it to d_model once
    (`_HeadSums`); autograd through each head's own copy of the norm, step by step, must agree, for
    both interpolations."""
    from mechscope.discovery.readers import HeadInputs

    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    summed = [discover(model, batch, method=m, steps=3, evaluator=ev).values for m in ("eap-ig", "eap-ig-activations")]
    monkeypatch.setattr(HeadInputs, "input_grad_terms", lambda *args, **kwargs: None)  # the autograd path for every layer
    for m, fast in zip(("eap-ig", "eap-ig-activations"), summed):
        torch.testing.assert_close(fast, discover(model, batch, method=m, steps=3, evaluator=ev).values, **exact_for(model))


@pytest.mark.parametrize("family", ["olmo2", "olmoe", "opt", "bloom", "falcon-new"])
def test_readers_of_families_that_read_differently(family):
    """OLMo-2 (no norm before attention or the MLP; q/k norms over all heads), OLMoE (the same q/k
    norms, routed experts), OPT (its MLP and the norm before it see the stream flattened to
    [batch * pos, d_model]), BLOOM (q|k|v interleaved per head, ALiBi, a norm on the embeddings) and
    Falcon's new architecture (grouped q|k|v, a norm each for attention and the MLP): a reader's q and
    k go through the whole norm, an MLP reader's input is the MLP's own, and a flattened one is
    unflattened. Edge patching against the literal reference, EAP against the gradient."""
    model = HookedModel(tiny_hf(family), byte_tokenizer())
    with torch.no_grad():
        test_edge_patching_equals_literal_reference(model)
    test_eap_is_the_gradient_of_the_edge_mask(model)


def test_eap_equals_exact_where_the_model_is_linear_downstream():
    """With the final norm taken out, the logits are linear in the final residual stream, and so is
    the logit difference: EAP on the edges into the logits is exact."""
    hf = tiny_hf("gpt2")
    hf.transformer.ln_f = nn.Identity()  # before wrapping: mechscope refuses a model changed under it
    model = HookedModel(hf, byte_tokenizer())
    batch = tiny_batch(model)
    ev = Evaluator(model, batch, Graph.from_model(model))
    eap = discover(model, batch, method="eap", evaluator=ev)
    exact = discover(model, batch, method="exact", evaluator=ev)
    into_logits = torch.tensor([n.endswith("->logits") for n in ev.graph.edge_names])
    torch.testing.assert_close(eap.values[into_logits], exact.values[into_logits], atol=1e-10, rtol=0)
    assert not torch.allclose(eap.values[~into_logits], exact.values[~into_logits], atol=1e-6)  # elsewhere, first order only


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_head_input_gradient_in_closed_form_is_autograds(family):
    """HeadInputs.input_grad (the norm's and the projection's Jacobians in closed form, which EAP
    uses) equals autograd through HeadInputs.value (each head's own copy of the norm), on every
    family, with the rank-one term computed or read from the heads' q, k and v; only where a q/k
    norm follows the projection does it defer to autograd."""
    from mechscope.discovery.readers import HeadInputs

    model = HookedModel(tiny_hf(family), byte_tokenizer())
    heads_of = HeadInputs(model)
    torch.manual_seed(0)
    x = torch.randn(2, 5, model.cfg.d_model, dtype=model.dtype) * 3 + 1  # [batch, pos, d_model], off-centre
    deferred = 0
    for layer in range(model.cfg.n_layers):
        parts = []
        for kind in "qkv":
            n = model.cfg.n_heads if kind == "q" else model.cfg.n_kv_heads
            heads = list(range(n))[::-1][:3]  # a subset, out of order
            parts.append((kind, heads, torch.randn(2, 5, len(heads), model.cfg.d_head, dtype=model.dtype)))
        for chosen in (parts, parts[2:], parts[:1]):  # all three kinds at once, v alone, q alone
            closed = heads_of.input_grad(layer, chosen, x)  # [n, batch, pos, d_model]
            if closed is not None:  # the rank-one term read from the heads' own q, k, v instead
                own = [heads_of.value(layer, kind, heads, x[:, :, None].expand(2, 5, len(heads), -1))
                       for kind, heads, _ in chosen]  # [batch, pos, n_kind, d_head] each
                torch.testing.assert_close(heads_of.input_grad(layer, chosen, x, own), closed, **exact_for(model))
            if closed is None:
                assert any(heads_of.projection(layer, kind)[2] is not None for kind, _, _ in chosen)  # a q/k norm after
                deferred += 1
                continue
            n = sum(len(heads) for _, heads, _ in chosen)
            xs = x[:, :, None].expand(2, 5, n, -1).clone().requires_grad_(True)
            values, i = [], 0
            with torch.enable_grad():
                for kind, heads, _ in chosen:
                    values.append(heads_of.value(layer, kind, heads, xs[:, :, i:i + len(heads)]))
                    i += len(heads)
                reference, = torch.autograd.grad(values, xs, [g for _, _, g in chosen])
            torch.testing.assert_close(closed, reference.permute(2, 0, 1, 3), **exact_for(model))  # (HF rounds RMSNorm to float32)
    assert deferred <= 2 * model.cfg.n_layers  # never v alone
