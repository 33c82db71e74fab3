"""Fast path patching equals a literal implementation of Wang et al.'s Appendix B."""

import pytest
import torch

from conftest import EXACT, FAMILIES, tiny_batch, tiny_model
from mechscope import InputError
from mechscope.metrics import logit_diff, read_logits
from mechscope.patching.path import path_patch

pytestmark = pytest.mark.usefixtures("no_grad")


def literal_path_patch(model, batch, receivers, receiver_input, at, direction):
    """Two full forwards per sender, exactly as the paper describes them."""
    source, target = batch.source_and_target(direction)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    z = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    recv = sorted({f"blocks.{l}.attn.hook_{receiver_input}" for l, _ in receivers}) if receivers != "logits" else []
    _, src = model.run_with_cache(source, names_filter=z)
    _, tgt = model.run_with_cache(target, names_filter=z + recv)
    metric = lambda logits: logit_diff(read_logits(logits, batch), batch).mean()  # noqa: E731
    base = metric(model(target))
    last = n_layers if receivers == "logits" else max(l for l, _ in receivers)
    out = torch.zeros(last, n_heads, dtype=torch.float64)
    for layer in range(last):
        for head in range(n_heads):
            def freeze(act, hook):  # every head keeps its target value, but the sender
                frozen = tgt[hook.name].clone()
                if hook.layer == layer:
                    frozen[:, :, head] = src[hook.name][:, :, head]
                return frozen

            recorded = {}
            step1 = model.run_with_hooks(target, fwd_hooks=[(n, freeze) for n in z] +
                                         [(n, lambda a, h: recorded.__setitem__(h.name, a.clone())) for n in recv])
            if receivers == "logits":
                out[layer, head] = metric(step1) - base
                continue

            def write(act, hook):
                act = act.clone()
                for l, h in receivers:
                    if l != hook.layer:
                        continue
                    if isinstance(at, str) and at == "all":
                        act[:, :, h] = recorded[hook.name][:, :, h]
                    else:
                        positions = batch.read_pos if isinstance(at, str) else at  # "read", or one per prompt
                        for b, p in enumerate(positions.tolist()):
                            act[b, p, h] = recorded[hook.name][b, p, h]
                return act

            out[layer, head] = metric(model.run_with_hooks(target, fwd_hooks=[(n, write) for n in recv])) - base
    return out


CASES = [("logits", "q", "all", "noise"), ([(2, 1)], "q", "all", "noise"), ([(2, 0), (1, 3)], "q", "read", "noise"),
         ([(2, 0)], "k", "read", "denoise"), ([(1, 0), (2, 0)], "v", "all", "denoise"),  # kv head 0: qwen2 has one
         ([(2, 0)], "v", torch.tensor([8, 11]), "noise"),  # one position per prompt (IOI: S2); within Gemma's window
         ([(0, 0), (2, 0)], "v", torch.tensor([8, 11]), "noise")]  # layer 1's senders come after one receiver


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("receivers, receiver_input, at, direction", CASES)
def test_fast_path_patching_equals_the_literal_method(family, receivers, receiver_input, at, direction):
    model = tiny_model(family)
    batch = tiny_batch(model)
    fast = path_patch(model, batch, receivers=receivers, receiver_input=receiver_input, at=at, direction=direction)
    slow = literal_path_patch(model, batch, receivers, receiver_input, at, direction)
    torch.testing.assert_close(fast.values, slow, **EXACT)
    assert fast.values.abs().max() > 1e-4 and fast.technique == "path"


def test_senders_after_a_receiver_reach_it_not(tmp_path):
    """A sender in the receiver's own layer cannot change that receiver's input."""
    model = tiny_model("llama-gqa")
    result = path_patch(model, tiny_batch(model), receivers=[(2, 1)], receiver_input="q")
    assert result.values.shape == (2, model.cfg.n_heads)  # senders in layers 0 and 1 only
    again = result.from_json(result.to_json(tmp_path / "p.json"))
    assert again.extra["receivers"] == ["2.1"] and torch.equal(again.values, result.values)


def test_bad_receivers():
    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    with pytest.raises(InputError, match=r"receivers \[\(2, 5\)\] are not heads"):
        path_patch(model, batch, receivers=[(2, 5)], receiver_input="k")  # 2 key/value heads
    with pytest.raises(InputError, match="no head sits before the receivers"):
        path_patch(model, batch, receivers=[(0, 1)])
    with pytest.raises(InputError, match="receiver_input 'q', 'k' or 'v'"):
        path_patch(model, batch, receivers=[(2, 1)], receiver_input="z")
    # Negative indices count from the end, as in Python.
    ends = path_patch(model, batch, receivers=[(-1, -1)], receiver_input="k", senders=[(-2, 0), (0, -1)])
    named = path_patch(model, batch, receivers=[(2, 1)], receiver_input="k", senders=[(1, 0), (0, 3)])
    assert torch.equal(ends.values.nan_to_num(7.0), named.values.nan_to_num(7.0))


def test_recorded_runs_shared_between_calls_give_the_same_numbers():
    from mechscope.patching import record_runs

    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    runs = record_runs(model, batch)
    for receivers, receiver_input, at in (([(2, 1)], "q", "read"), ([(2, 0)], "v", torch.tensor([8, 11])),
                                          ("logits", "q", "all"), ([(1, 0)], "k", "all")):
        shared = path_patch(model, batch, receivers=receivers, receiver_input=receiver_input, at=at, runs=runs)
        alone = path_patch(model, batch, receivers=receivers, receiver_input=receiver_input, at=at)
        torch.testing.assert_close(shared.values, alone.values, **EXACT)
    with pytest.raises(InputError, match="another batch or direction"):
        path_patch(model, batch, direction="denoise", runs=runs)
    with pytest.raises(InputError, match="another batch or direction"):
        path_patch(model, tiny_batch(model), runs=runs)


def test_path_patching_leaves_no_cycles_holding_tensors():
    """Every intermediate is freed when the call returns, not when the garbage collector next runs
    (a reference cycle once kept each resumed layer's keys and values alive: hundreds of MB)."""
    import gc

    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        path_patch(model, batch, receivers=[(2, 0)], receiver_input="v", at=torch.tensor([8, 11]))
        gc.collect()
        tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert tensors == []


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa", "gemma3"])
def test_step_two_in_length_groups_and_chunks_equals_the_literal_method(family, monkeypatch):
    """Senders in chunks of one and prompts in groups of their own suffix length (forced: every run
    is small here) give the literal numbers; the groups really split this batch."""
    from mechscope.patching import path
    from mechscope.patching.suffix import length_buckets
    from mechscope.tasks import ContrastiveBatch

    model = tiny_model(family)
    batch = ContrastiveBatch.from_pairs(
        model, ["the cat sat", "a dog ran far away", "one bird flew over the hill", "it rained"],
        ["the rat sat", "a fox ran far away", "one bird swam over the hill", "it snowed"],
        ["a", "b", "c", "d"], ["e", "f", "g", "h"])
    at = batch.read_pos - torch.tensor([0, 2, 0, 2])  # two groups of two; after each prompt's first difference; in Gemma's window
    lengths = batch.read_pos - at + 1
    assert len(length_buckets(lengths, buckets=4, least=1)) == 2
    monkeypatch.setattr(path, "LEAST_ROWS", 1)
    slow = literal_path_patch(model, batch, [(2, 0)], "v", at, "noise")
    for memory_mb in (0, 512):  # one sender per run; all of them in one
        fast = path_patch(model, batch, receivers=[(2, 0)], receiver_input="v", at=at, memory_mb=memory_mb)
        torch.testing.assert_close(fast.values, slow, **EXACT)
    assert slow.abs().max() > 1e-4
