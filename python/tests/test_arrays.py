"""Arrays cross into the core in place: pointers, dtypes, layouts, read-only memory."""

import numpy as np
import pytest

import tpo
from tpo import _arrays, _tpo
from conftest import make_batch

try:
    import ml_dtypes
except ImportError:  # bfloat16 NumPy arrays need ml_dtypes
    ml_dtypes = None


def dtypes():
    out = [np.float32, np.float64, np.float16]
    if ml_dtypes is not None:
        out.append(ml_dtypes.bfloat16)
    return out


@pytest.mark.parametrize("dtype", dtypes(), ids=lambda d: np.dtype(d).name)
def test_contiguous_numpy_inputs_are_read_in_place(dtype):
    x = np.zeros((2, 3, 5), dtype=dtype)
    seen = _tpo.inspect(_arrays.as_input(x))
    assert seen["data"] == x.ctypes.data
    assert seen["dtype"] == np.dtype(dtype).name and seen["shape"] == (2, 3, 5) and seen["device"] == "host"


def test_labels_and_read_only_arrays_are_read_in_place(tmp_path):
    y = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert _tpo.inspect(_arrays.as_input(y))["data"] == y.ctypes.data
    np.save(tmp_path / "z.npy", np.ones((2, 3, 4), np.float32))
    mapped = np.load(tmp_path / "z.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    assert _tpo.inspect(_arrays.as_input(mapped))["data"] == mapped.ctypes.data


def test_gradients_are_written_into_the_callers_arrays():
    rng = np.random.default_rng(1)
    batch = make_batch(rng, dtype=np.float32)
    objective = tpo.Objective()
    objective.forward(**batch)
    out = {name: np.zeros_like(batch[name]) for name in ("policy_chosen", "policy_rejected", "policy_chosen_noisy",
                                                          "policy_rejected_noisy")}
    pointers = {name: a.ctypes.data for name, a in out.items()}
    grads = objective.backward(out=out)
    for name, a in out.items():
        assert getattr(grads, name) is a and a.ctypes.data == pointers[name]
        assert np.any(a != 0)


def test_non_contiguous_inputs_give_the_results_of_their_contiguous_copies():
    rng = np.random.default_rng(2)
    batch = make_batch(rng, dtype=np.float64)
    # The same values behind a transposed and a strided view.
    strided = {}
    for name, value in batch.items():
        if value.ndim == 3:
            holder = np.zeros((value.shape[0], value.shape[1], 2 * value.shape[2]))
            holder[:, :, ::2] = value
            strided[name] = holder[:, :, ::2]
        else:
            strided[name] = np.asfortranarray(value)
        assert not strided[name].flags.c_contiguous
    want = tpo.Objective().forward(**batch)
    objective = tpo.Objective()
    got = objective.forward(**strided)
    assert got.loss == want.loss
    np.testing.assert_array_equal(got.chosen_rewards, want.chosen_rewards)
    grads = objective.backward()
    assert grads.policy_chosen.flags.c_contiguous


def test_non_contiguous_outputs_are_refused():
    rng = np.random.default_rng(3)
    batch = make_batch(rng)
    objective = tpo.Objective()
    objective.forward(**batch)
    out = np.zeros(batch["policy_chosen"].shape[::-1]).transpose(2, 1, 0)
    with pytest.raises(tpo.ShapeError, match=r"out\['policy_chosen'\]: not C-contiguous"):
        objective.backward(out={"policy_chosen": out})


@pytest.mark.parametrize("dtype", [np.float32, np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else []),
                         ids=lambda d: np.dtype(d).name)
def test_every_logits_dtype_agrees_with_float64_on_the_same_values(dtype):
    rng = np.random.default_rng(4)
    batch = make_batch(rng, dtype=np.float64)
    rounded = {k: (v.astype(dtype) if v.ndim == 3 else v) for k, v in batch.items()}
    exact = {k: (v.astype(dtype).astype(np.float64) if v.ndim == 3 else v) for k, v in batch.items()}
    objective = tpo.Objective()
    got = objective.forward(**rounded)
    grads = objective.backward()
    reference = tpo.Objective(backend="reference")
    want = reference.forward(**exact)
    want_grads = reference.backward()
    # The same input values: float accumulation only, and a gradient rounded to the dtype.
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
    np.testing.assert_allclose(got.policy_chosen_scores, want.policy_chosen_scores, rtol=1e-5)
    assert grads.policy_chosen.dtype == np.dtype(dtype)
    eps = float(np.finfo(np.float16).eps) if dtype == np.float16 else (2.0**-8 if dtype != np.float32 else 1e-6)
    np.testing.assert_allclose(grads.policy_chosen.astype(np.float64), want_grads.policy_chosen, rtol=0,
                               atol=eps * np.abs(want_grads.policy_chosen).max())


def test_int32_and_int64_labels_agree():
    rng = np.random.default_rng(5)
    batch = make_batch(rng)
    narrow = dict(batch, labels_chosen=batch["labels_chosen"].astype(np.int32),
                  labels_rejected=batch["labels_rejected"].astype(np.int32))
    assert tpo.Objective().forward(**narrow).loss == tpo.Objective().forward(**batch).loss


def test_policy_equal_to_reference_gives_ln2_per_pair():
    rng = np.random.default_rng(6)
    batch = make_batch(rng, dtype=np.float32)
    for side in ("chosen", "rejected"):
        batch[f"reference_{side}"] = batch[f"policy_{side}"].copy()
        batch[f"reference_{side}_noisy"] = batch[f"policy_{side}_noisy"].copy()
    for backend in tpo.backends:
        if backend == "cuda":
            continue
        result = tpo.Objective(backend=backend).forward(**batch)
        assert np.all(result.losses == np.log(2.0)), backend
        assert result.loss == pytest.approx(np.log(2.0), rel=1e-15, abs=0)
