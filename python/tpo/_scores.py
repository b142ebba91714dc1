"""tpo.token_scores: the per-token values of one side, as `tpo score` writes them."""

from . import _arrays, _tpo


class TokenScores:
    """Per-token values of one side, each (P, scored rows) (L − 1 rows with the shift), float64,
    zero where the aligned label is the ignore index:
    logps ℓ = z[y] − LSE(z); scores s = g(z)[y] − g(z̃)[y]; weights c = σ(±s) + a; mask (bool)."""

    __slots__ = ("logps", "scores", "weights", "mask")

    def __init__(self, logps, scores, weights, mask):
        self.logps, self.scores, self.weights, self.mask = logps, scores, weights, mask

    def __iter__(self):
        return iter((self.logps, self.scores, self.weights, self.mask))

    def __repr__(self):
        return f"tpo.TokenScores(shape={tuple(self.logps.shape)}, valid={int(self.mask.sum())})"


def token_scores(clean, noisy, labels, side="chosen", *, score="logit", a=0.5, shift=True, ignore_index=-100,
                 backend="auto", threads=0):
    """Which tokens TPO rewards: ℓ, the visual score and the self-calibrated weight of every token.

    clean, noisy: one model's logits (P, L, V) on the clean and on the corrupted image (float32,
    float64, bfloat16 or float16); labels (P, L) int64 or int32; side "chosen" or "rejected" (the
    weight is σ(s) + a for chosen tokens, 1 − σ(s) + a for rejected ones). Results are NumPy arrays.
    """
    return TokenScores(*_tpo.token_scores(
        _arrays.as_input(clean), _arrays.as_input(noisy), _arrays.as_input(labels), side=side, score=score,
        a=float(a), shift=bool(shift), ignore_index=int(ignore_index), backend=backend, threads=int(threads),
        stream=_arrays.cuda_stream(clean, noisy)))
