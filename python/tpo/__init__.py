"""tpo: Token Preference Optimization for trainers of vision-language models.

The C++ library's objective (TPO, DPO and the rest of TRL's DPO family) with exact gradients,
its image corruptors and its token rewards, on NumPy arrays and PyTorch tensors without copies:

    import tpo
    objective = tpo.Objective(method="tpo", loss_type="sigmoid", beta=0.1, a=0.5)
    result = objective.forward(policy_chosen, policy_chosen_noisy, policy_rejected, policy_rejected_noisy,
                               reference_chosen, reference_chosen_noisy, reference_rejected,
                               reference_rejected_noisy, labels_chosen, labels_rejected)
    grads = objective.backward()        # ∂loss/∂(policy logits), arrays like the inputs
    noisy = tpo.corrupt.diffusion(image, step=500)

`tpo.torch` (imported on its own: `import tpo.torch`) holds the autograd function. Every error is a
`tpo.Error`, a `ValueError`. See docs/python.md.
"""

from . import _tpo
from ._tpo import Error, InvalidValueError, NonFiniteResultError, ShapeError
from ._objective import Gradients, Objective, Result
from ._scores import TokenScores, token_scores
from . import corrupt

__version__ = _tpo.version

#: The backends built into this installation: "reference" always, "cpu" where Eigen was found
#: at build time, "cuda" in a CUDA build.
backends = tuple(_tpo.backends())


def release_cpu_scratch():
    """Frees the scratch memory the CPU backend keeps between calls; returns its size in bytes.

    The fused lm_head path's chunks of logits (by default 128 MiB of float, at least 512 rows of V)
    and a 16-bit head's float gradient accumulator (V×H) are kept for the next call rather than
    mapped and zeroed again every step; at most what one call had in use at once is kept."""
    return _tpo.release_cpu_scratch()


__all__ = ["Objective", "Result", "Gradients", "token_scores", "TokenScores", "corrupt", "Error", "ShapeError",
           "InvalidValueError", "NonFiniteResultError", "backends", "release_cpu_scratch"]
