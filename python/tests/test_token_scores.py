"""tpo.token_scores against `tpo score` on the same files and against the formulas of the token rewards."""

import numpy as np
import pytest

import tpo


@pytest.mark.parametrize("side", ["chosen", "rejected"])
@pytest.mark.parametrize("score", ["logit", "prob", "logprob"])
@pytest.mark.parametrize("shift", [True, False])
def test_token_scores_match_the_tool(tool, tmp_path, side, score, shift):
    rng = np.random.default_rng(1)
    z, zn = rng.normal(0, 2, (2, 6, 9)), rng.normal(0, 2, (2, 6, 9))
    y = rng.integers(0, 9, (2, 6))
    y[:, :2] = -100
    for name, a in (("z", z), ("zn", zn), ("y", y)):
        np.save(tmp_path / f"{name}.npy", a)
    tool("score", "--clean", tmp_path / "z.npy", "--noisy", tmp_path / "zn.npy", "--labels", tmp_path / "y.npy",
         "--side", side, "--score", score, "--a", "0.3", "--out", tmp_path / "t", *([] if shift else ["--no-shift"]))
    got = tpo.token_scores(z, zn, y, side, score=score, a=0.3, shift=shift)
    for name in ("logps", "scores", "weights"):
        np.testing.assert_allclose(getattr(got, name), np.load(tmp_path / "t" / f"{name}.npy"), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(got.mask, np.load(tmp_path / "t" / "mask.npy").astype(bool))


def test_token_scores_follow_the_formulas():
    rng = np.random.default_rng(2)
    z, zn = rng.normal(0, 2, (2, 5, 7)), rng.normal(0, 2, (2, 5, 7))
    y = rng.integers(0, 7, (2, 5))
    y[1, 3] = -100
    t = tpo.token_scores(z, zn, y, "rejected", a=0.5)
    assert t.logps.shape == (2, 4)
    for s in range(2):
        for r in range(4):
            label = y[s, r + 1]
            if label == -100:
                assert not t.mask[s, r] and t.logps[s, r] == 0 and t.weights[s, r] == 0
                continue
            lse = np.log(np.exp(z[s, r]).sum())
            score = z[s, r, label] - zn[s, r, label]
            assert t.logps[s, r] == pytest.approx(z[s, r, label] - lse, rel=1e-12)
            assert t.scores[s, r] == pytest.approx(score, rel=1e-12)
            assert t.weights[s, r] == pytest.approx(1 - 1 / (1 + np.exp(-score)) + 0.5, rel=1e-12)


def test_token_scores_refuse_bad_inputs():
    z = np.zeros((1, 3, 4), np.float32)
    with pytest.raises(tpo.InvalidValueError, match="label 4 at sequence 0, position 1 is outside"):
        tpo.token_scores(z, z, np.array([[0, 4, 1]]))
    bad = z.copy()
    bad[0, 1, 2] = np.nan
    with pytest.raises(tpo.InvalidValueError, match="noisy logits at sequence 0, position 2"):
        tpo.token_scores(z, bad, np.array([[0, 1, 1]]))
    with pytest.raises(tpo.ShapeError, match="noisy: dtype float64, expected float32"):
        tpo.token_scores(z, z.astype(np.float64), np.array([[0, 1, 1]]))
    with pytest.raises(tpo.InvalidValueError, match="side: 'both'"):
        tpo.token_scores(z, z, np.array([[0, 1, 1]]), "both")
