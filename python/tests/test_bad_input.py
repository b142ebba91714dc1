"""Bad inputs raise tpo.Error (a ValueError) naming the tensor, the shape or the value."""

import numpy as np
import pytest

import tpo
from conftest import make_batch


@pytest.fixture
def batch():
    return make_batch(np.random.default_rng(0), dtype=np.float32)


def raises(error, pattern, objective, **inputs):
    with pytest.raises(error, match=pattern) as raised:
        objective.forward(**inputs)
    assert isinstance(raised.value, ValueError)


def test_errors_are_value_errors():
    assert issubclass(tpo.Error, ValueError)
    assert issubclass(tpo.ShapeError, tpo.Error) and issubclass(tpo.InvalidValueError, tpo.Error)
    assert issubclass(tpo.NonFiniteResultError, tpo.InvalidValueError)


def test_a_result_that_overflows_is_an_error_and_disables_backward(batch):
    wide = {k: v.astype(np.float64) if v.ndim == 3 else v for k, v in batch.items()}
    o = tpo.Objective(loss_type="ipo", beta=1e-300)
    with pytest.raises(tpo.NonFiniteResultError, match="beta"):
        o.forward(**wide)
    with pytest.raises(tpo.Error, match="forward\\(\\) must run first"):
        o.backward()


def test_bad_options():
    for options, pattern in ((dict(beta=0), r"beta = 0, expected a finite value > 0"),
                             (dict(loss_type="dpo"), r"unknown loss_type 'dpo'"),
                             (dict(method="kto"), r"method: 'kto', expected tpo, dpo or weighted"),
                             (dict(score="softmax"), r"score: unknown kind 'softmax'"),
                             (dict(loss_type="sigmoid,sft", loss_weights=[1.0]), r"1 weights for 2 losses"),
                             (dict(backend="gpu"), r"backend: 'gpu', expected auto, cpu, reference or cuda"),
                             (dict(threads=-1), r"threads = -1"),
                             (dict(f_divergence_type="kl"), r"f_divergence_type: unknown value 'kl'")):
        with pytest.raises(tpo.InvalidValueError, match=pattern):
            tpo.Objective(**options)


def test_shapes_and_dtypes(batch):
    o = tpo.Objective()
    raises(tpo.ShapeError, r"rejected labels: shape \(3, 4\), expected \(3, 5\)", o,
           **dict(batch, labels_rejected=batch["labels_rejected"][:, :4]))
    raises(tpo.ShapeError, r"chosen policy noisy logits: shape \(3, 6, 10\) differs from policy logits shape",
           o, **dict(batch, policy_chosen_noisy=batch["policy_chosen_noisy"][:, :, :10].copy()))
    raises(tpo.ShapeError, r"reference_rejected: dtype float64, expected float32 as policy_chosen", o,
           **dict(batch, reference_rejected=batch["reference_rejected"].astype(np.float64)))
    raises(tpo.ShapeError, r"policy_chosen: dtype int32, expected float32 or float64 or bfloat16 or float16", o,
           **dict(batch, policy_chosen=batch["policy_chosen"].astype(np.int32)))
    raises(tpo.ShapeError, r"labels_chosen: dtype float64, expected int64 or int32", o,
           **dict(batch, labels_chosen=batch["labels_chosen"].astype(np.float64)))
    raises(tpo.ShapeError, r"policy_rejected: shape \(3, 5\) has 2 dimensions, expected 3", o,
           **dict(batch, policy_rejected=batch["policy_rejected"][:, :, 0]))
    raises(tpo.ShapeError, r"policy_chosen_noisy: list is not an array", o,
           **dict(batch, policy_chosen_noisy=[1.0, 2.0]))
    raises(tpo.ShapeError, r"labels_rejected: dtype int32, expected int64 as labels_chosen", o,
           **dict(batch, labels_rejected=batch["labels_rejected"].astype(np.int32)))
    missing = {k: v for k, v in batch.items() if k != "policy_rejected_noisy"}
    raises(tpo.ShapeError, r"rejected policy noisy logits", o, **missing)
    raises(tpo.ShapeError, r"policy_rejected: missing", o,
           **{k: v for k, v in batch.items() if k != "policy_rejected"})


def test_values(batch):
    o = tpo.Objective()
    bad = batch["labels_chosen"].copy()
    bad[1, 3] = 12
    raises(tpo.InvalidValueError, r"chosen labels: label 12 at sequence 1, position 3 is outside \[0, 11\)", o,
           **dict(batch, labels_chosen=bad))
    nan = batch["reference_rejected"].copy()
    nan[2, 3, 0] = np.nan
    raises(tpo.InvalidValueError, r"rejected reference logits at sequence 2, position 4: the row holds a NaN", o,
           **dict(batch, reference_rejected=nan))
    # Positions are those of the labels (a logits row t is scored against label t + 1).
    # The noisy rows' values outside z̃[y] do not enter the logit score: unchecked on request.
    inf = batch["policy_chosen_noisy"].copy()
    label = batch["labels_chosen"][1, 3]
    inf[1, 2, (label + 1) % 11] = np.inf
    raises(tpo.InvalidValueError, r"chosen policy noisy logits at sequence 1, position 3", o,
           **dict(batch, policy_chosen_noisy=inf))
    lean = tpo.Objective(check_unused_logits=False)
    assert np.isfinite(lean.forward(**dict(batch, policy_chosen_noisy=inf)).loss)


def test_backward_misuse(batch):
    o = tpo.Objective()
    with pytest.raises(tpo.Error, match="forward\\(\\) must run first"):
        o.backward()
    o.forward(**batch)
    with pytest.raises(tpo.ShapeError, match=r"gradient of policy logits: shape \(3, 6, 10\), expected \(3, 6, 11\)"):
        o.backward(out={"policy_chosen": np.zeros((3, 6, 10), np.float32)})
    with pytest.raises(tpo.ShapeError, match=r"out\['policy_rejected'\]: dtype float64, expected float32"):
        o.backward(out={"policy_rejected": np.zeros((3, 5, 11))})
    with pytest.raises(tpo.ShapeError, match=r"out names \['reference_chosen'\]"):
        o.backward(out={"reference_chosen": np.zeros((3, 6, 11), np.float32)})
    o.release()
    with pytest.raises(tpo.Error, match="forward\\(\\) must run first"):
        o.backward()
    dpo = tpo.Objective(method="dpo")
    dpo.forward(**{k: v for k, v in batch.items() if "noisy" not in k})
    with pytest.raises(tpo.ShapeError, match="forward\\(\\) had no such input"):
        dpo.backward(out={"policy_chosen_noisy": np.zeros((3, 6, 11), np.float32)})


def test_legitimate_edges_are_not_errors():
    rng = np.random.default_rng(1)
    batch = make_batch(rng, pairs=1, lengths=(1, 1), vocab=1)  # L = 1 with the shift: no scored token
    result = tpo.Objective().forward(**batch)
    assert result.loss == pytest.approx(np.log(2)) and result.chosen_tokens[0] == 0
    masked = make_batch(rng)
    masked["labels_chosen"][:] = -100
    assert np.isfinite(tpo.Objective().forward(**masked).loss)
