"""Objective.forward_hidden (hidden states and the lm_head in, the fused lm_head path) against the
logits path on logits computed here from the same states, and against finite differences."""

import numpy as np
import pytest

import tpo


def hidden_batch(rng, pairs=2, lengths=(5, 4), hidden=6, vocab=9, noisy=True):
    states, labels = {}, {}
    for side, length in zip(("chosen", "rejected"), lengths):
        for role in ("policy", "reference"):
            states[f"{role}_{side}"] = rng.standard_normal((pairs, length, hidden))
            if noisy:
                states[f"{role}_{side}_noisy"] = rng.standard_normal((pairs, length, hidden))
        y = rng.integers(0, vocab, (pairs, length))
        y[:, 0] = -100
        labels[f"labels_{side}"] = y
    heads = dict(lm_head=rng.standard_normal((vocab, hidden)), lm_head_bias=rng.standard_normal(vocab),
                 reference_lm_head=rng.standard_normal((vocab, hidden)), reference_lm_head_bias=None)
    return states, labels, heads


def transform(u, scale, softcap, temperature):
    """z and dz/du of the logit transform softcap·tanh(scale·u/softcap)/temperature (docs/formulas.md)."""
    if softcap is None:
        return scale * u / temperature, np.full_like(u, scale / temperature)
    t = np.tanh(scale * u / softcap)
    return softcap * t / temperature, scale * (1 - t * t) / temperature


CASES = [dict(), dict(method="dpo"), dict(logit_scale=0.7, logit_softcap=3.0, temperature=1.3),
         dict(score="prob", chunk_tokens=2), dict(loss_type="ipo", form="multiplicative")]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("options", CASES, ids=[str(c) for c in CASES])
def test_hidden_states_match_the_logits_path(options, backend):
    if backend not in tpo.backends:
        pytest.skip(f"backend {backend} not built")
    rng = np.random.default_rng(1)
    noisy = options.get("method", "tpo") == "tpo"
    states, labels, heads = hidden_batch(rng, noisy=noisy)
    scale, softcap, temperature = (options.get("logit_scale", 1.0), options.get("logit_softcap"),
                                   options.get("temperature", 1.0))
    logits, slopes = {}, {}
    for name, h in states.items():
        w = heads["reference_lm_head"] if name.startswith("reference") else heads["lm_head"]
        b = 0 if name.startswith("reference") else heads["lm_head_bias"]
        logits[name], slopes[name] = transform(h @ w.T + b, scale, softcap, temperature)

    fused = tpo.Objective(backend=backend, **options)
    got = fused.forward_hidden(**states, **labels, **heads)
    grads = fused.backward()
    plain = tpo.Objective(backend="reference", **{k: v for k, v in options.items() if k == "method" or k in (
        "loss_type", "form", "score")})
    want = plain.forward(**logits, **labels)
    want_grads = plain.backward()

    assert got.loss == pytest.approx(want.loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(got.chosen_rewards, want.chosen_rewards, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.policy_rejected_scores, want.policy_rejected_scores, rtol=1e-10)
    # The chain through the transform and the head, written out.
    w = heads["lm_head"]
    head_grad, bias_grad = np.zeros_like(w), np.zeros(w.shape[0])
    for name in ("policy_chosen", "policy_rejected") + (("policy_chosen_noisy", "policy_rejected_noisy") if noisy
                                                         else ()):
        du = getattr(want_grads, name) * slopes[name]
        np.testing.assert_allclose(getattr(grads, name), du @ w, rtol=1e-8, atol=1e-12, err_msg=name)
        head_grad += np.einsum("slv,slh->vh", du, states[name])
        bias_grad += du.sum(axis=(0, 1))
    np.testing.assert_allclose(grads.lm_head, head_grad, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(grads.lm_head_bias, bias_grad, rtol=1e-8, atol=1e-12)


def test_hidden_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    states, labels, heads = hidden_batch(rng, pairs=1, lengths=(4, 3), hidden=3, vocab=5)
    options = dict(logit_softcap=4.0, temperature=0.9, backend="reference")
    objective = tpo.Objective(**options)
    objective.forward_hidden(**states, **labels, **heads)
    grads = objective.backward()

    def loss(replace):
        arrays = dict(states, **heads)
        arrays.update(replace)
        inputs = {k: v for k, v in arrays.items() if not k.startswith(("lm_head", "reference_lm_head"))}
        return tpo.Objective(**options).forward_hidden(
            **inputs, **labels, lm_head=arrays["lm_head"], lm_head_bias=arrays["lm_head_bias"],
            reference_lm_head=arrays["reference_lm_head"]).loss

    eps = 1e-6
    for name in ("policy_chosen", "policy_rejected_noisy", "lm_head", "lm_head_bias"):
        base = states[name] if name in states else heads[name]
        numeric = np.zeros_like(base)
        for index in np.ndindex(*base.shape):
            up, down = base.copy(), base.copy()
            up[index] += eps
            down[index] -= eps
            numeric[index] = (loss({name: up}) - loss({name: down})) / (2 * eps)
        np.testing.assert_allclose(getattr(grads, name), numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_hidden_state_inputs_refuse_bad_heads():
    rng = np.random.default_rng(3)
    states, labels, heads = hidden_batch(rng)
    o = tpo.Objective()
    with pytest.raises(tpo.ShapeError, match="lm_head: dtype float32, expected float64"):
        o.forward_hidden(**states, **labels, **dict(heads, lm_head=heads["lm_head"].astype(np.float32)))
    with pytest.raises(tpo.ShapeError, match="lm_head_bias: shape \\(9, 1\\) has 2 dimensions, expected 1"):
        o.forward_hidden(**states, **labels, **dict(heads, lm_head_bias=heads["lm_head_bias"][:, None]))
    with pytest.raises(tpo.Error, match="hidden"):
        o.forward_hidden(**states, **labels, **dict(heads, lm_head=heads["lm_head"][:, :5].copy()))
    o.forward_hidden(**states, **labels, **heads)
    with pytest.raises(tpo.ShapeError, match="out\\['lm_head'\\]: shape \\(9, 5\\), expected that of the lm_head"):
        o.backward(out={"lm_head": np.zeros((9, 5))})


def test_cpu_scratch_is_kept_between_calls_and_released_on_request():
    if "cpu" not in tpo.backends:
        pytest.skip("backend cpu not built")
    rng = np.random.default_rng(5)
    # 2 pairs of 40 tokens at V = 4096 in float64: each side's chunk of logits is 2.5 MiB, in the
    # range the CPU backend keeps.
    states, labels, heads = hidden_batch(rng, lengths=(40, 40), hidden=8, vocab=4096)
    objective = tpo.Objective(backend="cpu")
    tpo.release_cpu_scratch()
    runs = []
    for _ in range(2):
        result = objective.forward_hidden(**states, **labels, **heads)
        runs.append((result.loss, objective.backward().lm_head.copy()))
    assert runs[1][0] == runs[0][0]
    np.testing.assert_array_equal(runs[1][1], runs[0][1])
    assert tpo.release_cpu_scratch() >= 2 * 40 * 4096 * 8 // 2
    assert tpo.release_cpu_scratch() == 0
