"""Path attribution is the derivative of the path-patching effect: checked against central differences
of a literal path patch that moves one sender a fraction alpha of the way to its source value."""

import pytest
import torch

from conftest import exact_for, tiny_batch, tiny_model
from mechscope import InputError
from mechscope.metrics import logit_diff, read_logits
from mechscope.patching import path_attribution, path_patch


def literal_along_a_line(model, batch, receivers, receiver_input, at, direction, sender, alpha) -> float:
    """Wang et al.'s two forwards, with the sender at target + alpha * (source - target)."""
    source, target = batch.source_and_target(direction)
    z = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    recv = sorted({f"blocks.{l}.attn.hook_{receiver_input}" for l, _ in receivers}) if receivers != "logits" else []
    _, src = model.run_with_cache(source, names_filter=z)
    _, tgt = model.run_with_cache(target, names_filter=z)
    metric = lambda logits: logit_diff(read_logits(logits, batch), batch).mean().item()  # noqa: E731

    def freeze(act, hook):
        frozen = tgt[hook.name].clone()
        if hook.layer == sender[0]:
            h = sender[1]
            frozen[:, :, h] += alpha * (src[hook.name][:, :, h] - tgt[hook.name][:, :, h])
        return frozen

    recorded = {}
    step1 = model.run_with_hooks(target, fwd_hooks=[(n, freeze) for n in z] +
                                 [(n, lambda a, h: recorded.__setitem__(h.name, a.clone())) for n in recv])
    if receivers == "logits":
        return metric(step1)

    def write(act, hook):
        act = act.clone()
        for l, h in receivers:
            if l == hook.layer:
                if isinstance(at, str) and at == "all":
                    act[:, :, h] = recorded[hook.name][:, :, h]
                else:
                    for b, p in enumerate((batch.read_pos if isinstance(at, str) else at).tolist()):
                        act[b, p, h] = recorded[hook.name][b, p, h]
        return act

    return metric(model.run_with_hooks(target, fwd_hooks=[(n, write) for n in recv]))


CASES = [("logits", "q", "all", "noise"), ([(2, 1)], "q", "read", "noise"), ([(2, 0), (1, 3)], "q", "all", "denoise"),
         ([(2, 0)], "k", "read", "noise"), ([(2, 0)], "v", torch.tensor([8, 11]), "noise")]


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
@pytest.mark.parametrize("receivers, receiver_input, at, direction", CASES)
def test_estimate_is_the_derivative_of_the_path_patching_effect(family, receivers, receiver_input, at, direction):
    model = tiny_model(family)
    batch = tiny_batch(model)
    estimate = path_attribution(model, batch, receivers=receivers, receiver_input=receiver_input, at=at,
                                direction=direction)
    last = estimate.values.shape[0]
    exact = exact_for(model) == exact_for(tiny_model("gpt2"))
    # LayerNorm families run in float64 throughout: a small step, a tight check. Hugging Face's RMSNorm
    # computes in float32 even in a float64 model, so there the step is larger (the function's float32
    # noise, ~1e-7, over the step) and the check looser by as much.
    eps, tol = (1e-4, 1e-7) if exact else (1e-2, 2e-3)
    scale = max(estimate.values.abs().max().item(), 1e-3)
    with torch.no_grad():
        for sender in [(0, 1), (last - 1, 0), (last - 1, 3)]:
            up, down = (literal_along_a_line(model, batch, receivers, receiver_input, at, direction, sender, a)
                        for a in (eps, -eps))
            derivative = (up - down) / (2 * eps)
            assert estimate.values[sender].item() == pytest.approx(derivative, abs=tol * scale), sender
    assert estimate.values.abs().max() > 0  # a non-trivial check


def test_ranks_senders_as_path_patching_does():
    """Not exact away from the target, but a useful ranking: the same sign on the larger effects."""
    model = tiny_model("llama-gqa")
    batch = tiny_batch(model)
    for receivers, receiver_input, at in (("logits", "q", "all"), ([(2, 1)], "q", "read"), ([(1, 0)], "k", "all")):
        estimate = path_attribution(model, batch, receivers=receivers, receiver_input=receiver_input, at=at)
        exact = path_patch(model, batch, receivers=receivers, receiver_input=receiver_input, at=at)
        e, x = estimate.values.flatten(), exact.values.flatten()
        assert torch.corrcoef(torch.stack([e, x]).double())[0, 1] > 0.9
        big = x.abs() > 0.3 * x.abs().max()
        assert (e[big].sign() == x[big].sign()).all()


def test_bad_receivers_and_runs():
    from mechscope.patching import record_runs

    model = tiny_model("gpt2")
    batch = tiny_batch(model)
    with pytest.raises(InputError, match="receiver_input"):
        path_attribution(model, batch, receivers=[(2, 0)], receiver_input="z")
    with pytest.raises(InputError, match="not heads of this model"):
        path_attribution(model, batch, receivers=[(9, 0)])
    with pytest.raises(InputError, match="no head sits before"):
        path_attribution(model, batch, receivers=[(0, 0)])
    with pytest.raises(InputError, match="another batch or direction"):
        path_attribution(model, batch, direction="denoise", runs=record_runs(model, batch))
