"""Objective.backward against central finite differences of Objective.forward, in float64
(|analytic − numeric| <= atol + rtol·|numeric|, eps 1e-6, as PyTorch's gradcheck)."""

import numpy as np
import pytest

import tpo
from conftest import make_batch

CASES = [
    dict(),
    dict(loss_type="hinge", beta=0.05),
    dict(loss_type="ipo"),
    dict(loss_type="exo_pair", label_smoothing=0.1),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="aot"),
    dict(loss_type="aot_unpaired"),
    dict(loss_type="discopop"),
    dict(loss_type="sigmoid,bco_pair,sft", loss_weights=[0.8, 0.2, 1.0]),
    dict(score="prob"),
    dict(score="logprob", form="multiplicative"),
    dict(average=True, a=0.0),
    dict(f_divergence_type="js_divergence", loss_type="sigmoid_norm"),
    dict(ld_alpha=0.3),
    dict(method="dpo", loss_type="nca_pair"),
    dict(method="weighted", loss_type="sppo_hard"),
    dict(method="weighted", form="multiplicative", average=True),
]


def numeric_gradient(objective, batch, name, index, eps=1e-6):
    def loss_at(delta):
        shifted = dict(batch)
        shifted[name] = batch[name].copy()
        shifted[name][index] += delta
        return objective.forward(**shifted).loss

    return (loss_at(eps) - loss_at(-eps)) / (2 * eps)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("options", CASES, ids=[str(c) for c in CASES])
def test_gradients_match_finite_differences(options, backend):
    if backend not in tpo.backends:
        pytest.skip(f"backend {backend} not built")
    rng = np.random.default_rng(7)
    method = options.get("method", "tpo")
    batch = make_batch(rng, pairs=2, lengths=(5, 4), vocab=6, noisy=method == "tpo")
    if method == "weighted":
        for side in ("chosen", "rejected"):
            batch[f"weights_{side}"] = rng.uniform(0.5, 1.5, batch[f"labels_{side}"].shape).astype(np.float32)
    objective = tpo.Objective(backend=backend, **options)
    objective.forward(**batch)
    grads = objective.backward()
    names = ["policy_chosen", "policy_rejected"] + (["policy_chosen_noisy", "policy_rejected_noisy"]
                                                    if method == "tpo" else [])
    for name in names:
        analytic = getattr(grads, name)
        numeric = np.zeros_like(analytic)
        for index in np.ndindex(*analytic.shape):
            numeric[index] = numeric_gradient(objective, batch, name, index)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7, err_msg=name)
    # Gradients of logits that are never read (masked rows) are exactly zero.
    assert np.all(grads.policy_chosen[:, 0, :] == 0)


def test_gradients_into_out_arrays_and_only_those():
    rng = np.random.default_rng(3)
    batch = make_batch(rng)
    objective = tpo.Objective()
    objective.forward(**batch)
    full = objective.backward()
    out = np.full_like(batch["policy_chosen"], np.nan)
    grads = objective.backward(out={"policy_chosen": out})
    assert grads.policy_chosen is out and grads.policy_rejected is None and grads.policy_chosen_noisy is None
    np.testing.assert_array_equal(out, full.policy_chosen)
    again = tpo.Gradients(policy_rejected_noisy=np.empty_like(batch["policy_rejected_noisy"]))
    assert objective.backward(out=again) is not None
    np.testing.assert_array_equal(again.policy_rejected_noisy, full.policy_rejected_noisy)


def test_detached_weights_are_constants_of_the_gradient():
    """detach_weights: the gradient of TPO with c held fixed, which is caller-weighted DPO with weights c
    (the reference entering as sequence scores, so that c is the policy's alone)."""
    rng = np.random.default_rng(11)
    batch = make_batch(rng, pairs=2, lengths=(6, 5), vocab=7)
    policy = {k: v for k, v in batch.items() if k.startswith(("policy", "labels"))}
    scores = dict(reference_chosen_scores=rng.normal(-8, 1, 2), reference_rejected_scores=rng.normal(-8, 1, 2))
    detached = tpo.Objective(detach_weights=True, backend="reference")
    detached.forward(**policy, **scores)
    got = detached.backward()
    weights = {}
    for side in ("chosen", "rejected"):
        tokens = tpo.token_scores(batch[f"policy_{side}"], batch[f"policy_{side}_noisy"], batch[f"labels_{side}"], side)
        w = np.ones(batch[f"labels_{side}"].shape, np.float32)
        w[:, 1:] = tokens.weights  # caller weights sit at the label's position (shift)
        weights[f"weights_{side}"] = w
    weighted = tpo.Objective(method="weighted", backend="reference")
    weighted.forward(policy_chosen=batch["policy_chosen"], policy_rejected=batch["policy_rejected"],
                     labels_chosen=batch["labels_chosen"], labels_rejected=batch["labels_rejected"], **weights, **scores)
    want = weighted.backward()
    for name in ("policy_chosen", "policy_rejected"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-9, err_msg=name)
    # Under the logit score the noisy logits enter only through c.
    assert np.all(got.policy_chosen_noisy == 0) and np.all(got.policy_rejected_noisy == 0)


def test_wpo_weights_are_constants_of_the_gradient():
    """use_weighting (WPO, as TRL: weights under no_grad): each pair's gradient is its plain gradient
    times its weight, the weight being the ratio of the pair's two losses."""
    rng = np.random.default_rng(13)
    batch = make_batch(rng, pairs=3, lengths=(6, 5), vocab=7, scale=0.5)
    plain, weighted = tpo.Objective(backend="reference"), tpo.Objective(use_weighting=True, backend="reference")
    plain_losses = plain.forward(**batch).losses
    plain_grads = plain.backward()
    weights = weighted.forward(**batch).losses / plain_losses
    assert np.all(weights > 0) and not np.allclose(weights, 1)
    weighted_grads = weighted.backward()
    for name in ("policy_chosen", "policy_rejected", "policy_chosen_noisy", "policy_rejected_noisy"):
        np.testing.assert_allclose(getattr(weighted_grads, name), getattr(plain_grads, name) * weights[:, None, None],
                                   rtol=1e-9, atol=1e-15, err_msg=name)
