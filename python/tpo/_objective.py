"""tpo.Objective: the loss, its metrics and its gradients."""

from . import _arrays, _tpo

_LOGITS = ("policy_chosen", "policy_chosen_noisy", "policy_rejected", "policy_rejected_noisy",
           "reference_chosen", "reference_chosen_noisy", "reference_rejected", "reference_rejected_noisy")
_GRADIENTS = ("policy_chosen", "policy_chosen_noisy", "policy_rejected", "policy_rejected_noisy")
_HEAD_GRADIENTS = ("lm_head", "lm_head_bias")


class Result:
    """What a forward reports (NumPy float64 arrays of one value per pair, and floats).

    loss: the batch loss (mean over pairs, weighted sum of the combined losses).
    losses: per-pair loss. chosen_rewards, rejected_rewards: β·(A_θ − A_ref) per pair.
    reward_accuracy, reward_margin: batch means of [r_w > r_l] and r_w − r_l.
    policy_chosen_scores, policy_rejected_scores, reference_chosen_scores, reference_rejected_scores:
    the sequence scores A (for TPO: Σ m·(ℓ + log c)). mean_visual_score_chosen/rejected: Σ m·s / (Σ m + 1e-8).
    chosen_tokens, rejected_tokens: valid tokens per sequence. grad_policy_chosen_scores,
    grad_policy_rejected_scores: ∂loss/∂A_θ per sequence.
    """

    __slots__ = ("loss", "reward_accuracy", "reward_margin", "losses", "chosen_rewards", "rejected_rewards",
                 "policy_chosen_scores", "policy_rejected_scores", "reference_chosen_scores",
                 "reference_rejected_scores", "mean_visual_score_chosen", "mean_visual_score_rejected",
                 "chosen_tokens", "rejected_tokens", "grad_policy_chosen_scores", "grad_policy_rejected_scores")

    def __init__(self, values):
        for name in self.__slots__:
            setattr(self, name, values[name])

    def metrics(self, prefix=""):
        """The batch means under the names TRL's DPOTrainer logs, plus TPO's visual scores.
        logps/* are the policy's sequence scores A: the sums of log-probabilities for DPO, and for
        TPO the sums of ℓ + log c that its loss compares."""
        return {
            f"{prefix}rewards/chosen": float(self.chosen_rewards.mean()),
            f"{prefix}rewards/rejected": float(self.rejected_rewards.mean()),
            f"{prefix}rewards/accuracies": float(self.reward_accuracy),
            f"{prefix}rewards/margins": float(self.reward_margin),
            f"{prefix}logps/chosen": float(self.policy_chosen_scores.mean()),
            f"{prefix}logps/rejected": float(self.policy_rejected_scores.mean()),
            f"{prefix}visual_score/chosen": float(self.mean_visual_score_chosen.mean()),
            f"{prefix}visual_score/rejected": float(self.mean_visual_score_rejected.mean()),
        }

    def __repr__(self):
        return (f"tpo.Result(loss={self.loss!r}, pairs={len(self.losses)}, "
                f"reward_accuracy={self.reward_accuracy!r}, reward_margin={self.reward_margin!r})")


class Gradients:
    """∂loss/∂(policy logits), or with hidden states in ∂loss/∂(policy hidden states) and ∂loss/∂ of
    the lm_head's weight and bias: arrays of the inputs' shape, dtype, framework and device (None:
    not computed)."""

    __slots__ = _GRADIENTS + _HEAD_GRADIENTS

    def __init__(self, policy_chosen=None, policy_chosen_noisy=None, policy_rejected=None,
                 policy_rejected_noisy=None, lm_head=None, lm_head_bias=None):
        self.policy_chosen = policy_chosen
        self.policy_chosen_noisy = policy_chosen_noisy
        self.policy_rejected = policy_rejected
        self.policy_rejected_noisy = policy_rejected_noisy
        self.lm_head = lm_head
        self.lm_head_bias = lm_head_bias

    def __iter__(self):
        return iter(getattr(self, name) for name in _GRADIENTS)

    def __repr__(self):
        shapes = {name: tuple(getattr(self, name).shape) for name in self.__slots__ if getattr(self, name) is not None}
        return f"tpo.Gradients({shapes})"


class Objective:
    """The preference objective, configured once, evaluated on each batch.

    method: "tpo" (self-calibrated token weights from clean and noisy logits), "dpo" (weights 1,
    no noisy logits) or "weighted" (the caller's token weights, `weights_chosen`/`weights_rejected`).
    loss_type: one loss or a list/comma-separated string ("sigmoid,bco_pair,sft" with loss_weights
    [0.8, 0.2, 1.0] is MPO): sigmoid, hinge, ipo, sigmoid_norm, exo_pair, nca_pair, robust, bco_pair,
    sppo_hard, aot, aot_unpaired (aot_pair), apo_zero, apo_down, discopop, sft.
    beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau, use_weighting
    (WPO), ld_alpha (LD-DPO): as TRL's DPOConfig names them. a: calibration margin, c ∈ (a, 1 + a).
    score: "logit" (the official TPO), "prob" or "logprob". form: "additive" (Σ ℓ + log c) or
    "multiplicative" (Σ c·ℓ). average: divide sequence scores by their token counts.
    detach_weights: c is a constant in the gradient. shift: logits at t predict the label at t + 1.
    ignore_index: label of positions that are not scored. check_inputs: report bad labels and
    NaN/Inf logits as errors. check_unused_logits: also scan the noisy logits' rows that the logit
    score does not read (False saves two tensor reads per step).
    logit_scale, logit_softcap, temperature: the transform between the lm_head and the softmax,
    z = softcap·tanh(logit_scale·u / softcap) / temperature, applied with hidden states in (logits
    inputs are taken as already transformed); chunk_tokens: scored rows per chunk of the fused
    lm_head path (None: about 2^24 logits a chunk; on the CPU about 2^25, and at least 512 rows).
    backend: "auto" (cpu for host arrays, cuda for CUDA tensors), "cpu", "reference" (the oracle)
    or "cuda". threads: CPU threads (0: OpenMP's default).

    Not safe for concurrent use from several threads: one Objective per thread.
    """

    def __init__(self, method="tpo", loss_type="sigmoid", *, loss_weights=None, beta=0.1, label_smoothing=0.0,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05, a=0.5,
                 score="logit", form="additive", average=False, detach_weights=False, shift=True,
                 ignore_index=-100, use_weighting=False, ld_alpha=None, check_inputs=True,
                 check_unused_logits=True, logit_scale=1.0, logit_softcap=None, temperature=1.0, chunk_tokens=None,
                 backend="auto", threads=0):
        if isinstance(loss_type, str):
            loss_type = loss_type.split(",")
        loss_type = [str(t).strip() for t in loss_type]
        if isinstance(loss_weights, str):
            loss_weights = [float(w) for w in loss_weights.split(",")]
        self.method = method
        self.loss_type = loss_type
        self.options = dict(method=method, loss_type=loss_type,
                            loss_weights=None if loss_weights is None else [float(w) for w in loss_weights],
                            beta=float(beta), label_smoothing=float(label_smoothing),
                            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=float(f_alpha_divergence_coef),
                            discopop_tau=float(discopop_tau), a=float(a), score=score, form=form,
                            average=bool(average), detach_weights=bool(detach_weights), shift=bool(shift),
                            ignore_index=int(ignore_index), use_weighting=bool(use_weighting),
                            ld_alpha=None if ld_alpha is None else float(ld_alpha), check_inputs=bool(check_inputs),
                            check_unused_logits=bool(check_unused_logits), logit_scale=float(logit_scale),
                            logit_softcap=None if logit_softcap is None else float(logit_softcap),
                            temperature=float(temperature),
                            chunk_tokens=None if chunk_tokens is None else int(chunk_tokens), backend=backend,
                            threads=int(threads))
        self._core = _tpo.Objective(**self.options)
        self._logits = None  # the forward's logits, for shaping the gradients

    @property
    def noisy(self):
        """Whether the objective reads noisy logits (method "tpo")."""
        return self.method == "tpo"

    def forward(self, policy_chosen, policy_chosen_noisy=None, policy_rejected=None, policy_rejected_noisy=None,
                reference_chosen=None, reference_chosen_noisy=None, reference_rejected=None,
                reference_rejected_noisy=None, labels_chosen=None, labels_rejected=None, *, weights_chosen=None,
                weights_rejected=None, reference_chosen_scores=None, reference_rejected_scores=None):
        """The loss and metrics of one batch; keeps what backward() needs.

        Logits (P, L, V) in float32, float64, bfloat16 or float16, all of one dtype; labels (P, L)
        int64 or int32. Chosen and rejected may differ in L. The reference model enters through its
        logits or, precomputed, through its sequence scores (float64, (P,); e.g. a previous
        Result's reference_*_scores). Caller token weights (method "weighted"): float32 (P, L).
        Arrays are read in place (NumPy, PyTorch on the CPU or CUDA, anything with __dlpack__).
        """
        logits = (policy_chosen, policy_chosen_noisy, policy_rejected, policy_rejected_noisy, reference_chosen,
                  reference_chosen_noisy, reference_rejected, reference_rejected_noisy)
        given = _arrays.as_input
        chosen = dict(policy=given(policy_chosen), policy_noisy=given(policy_chosen_noisy),
                      reference=given(reference_chosen), reference_noisy=given(reference_chosen_noisy),
                      labels=given(labels_chosen), weights=given(weights_chosen),
                      reference_scores=given(reference_chosen_scores))
        rejected = dict(policy=given(policy_rejected), policy_noisy=given(policy_rejected_noisy),
                        reference=given(reference_rejected), reference_noisy=given(reference_rejected_noisy),
                        labels=given(labels_rejected), weights=given(weights_rejected),
                        reference_scores=given(reference_rejected_scores))
        self._logits = None
        values = self._core.forward(chosen, rejected, _arrays.cuda_stream(*logits))
        self._logits = dict(zip(_LOGITS[:4], logits[:4]))
        return Result(values)

    __call__ = forward

    def forward_hidden(self, policy_chosen, policy_chosen_noisy=None, policy_rejected=None,
                       policy_rejected_noisy=None, reference_chosen=None, reference_chosen_noisy=None,
                       reference_rejected=None, reference_rejected_noisy=None, labels_chosen=None,
                       labels_rejected=None, *, lm_head, lm_head_bias=None, reference_lm_head=None,
                       reference_lm_head_bias=None, weights_chosen=None, weights_rejected=None,
                       reference_chosen_scores=None, reference_rejected_scores=None):
        """forward() with the last hidden states (P, L, H) in place of the logits: the logits
        transform(h·lm_headᵀ + bias) are computed a chunk of rows at a time inside the library and
        never stored whole. lm_head: the policy's (V, H) weight; reference_lm_head: the reference
        model's own (required when the reference enters as hidden states). One dtype for all.
        backward() then gives ∂loss/∂(hidden states), and ∂loss/∂lm_head (and bias).
        """
        states = (policy_chosen, policy_chosen_noisy, policy_rejected, policy_rejected_noisy, reference_chosen,
                  reference_chosen_noisy, reference_rejected, reference_rejected_noisy)
        given = _arrays.as_input
        chosen = dict(policy=given(policy_chosen), policy_noisy=given(policy_chosen_noisy),
                      reference=given(reference_chosen), reference_noisy=given(reference_chosen_noisy),
                      labels=given(labels_chosen), weights=given(weights_chosen),
                      reference_scores=given(reference_chosen_scores))
        rejected = dict(policy=given(policy_rejected), policy_noisy=given(policy_rejected_noisy),
                        reference=given(reference_rejected), reference_noisy=given(reference_rejected_noisy),
                        labels=given(labels_rejected), weights=given(weights_rejected),
                        reference_scores=given(reference_rejected_scores))
        heads = dict(head=given(lm_head), head_bias=given(lm_head_bias), reference_head=given(reference_lm_head),
                     reference_head_bias=given(reference_lm_head_bias))
        self._logits = None
        values = self._core.forward(chosen, rejected, _arrays.cuda_stream(*states, lm_head), heads)
        self._logits = dict(zip(_LOGITS[:4], states[:4]), lm_head=lm_head, lm_head_bias=lm_head_bias)
        return Result(values)

    def backward(self, out=None):
        """∂(batch loss)/∂(policy logits) of the last forward (or ∂/∂(policy hidden states) and
        ∂/∂lm_head, ∂/∂lm_head_bias after forward_hidden).

        out=None: new arrays like the inputs (their framework, dtype and device), one per policy
        tensor the objective differentiates (the noisy ones for TPO; the lm_head and its bias with
        hidden states). Otherwise a Gradients or a dict naming some of policy_chosen,
        policy_chosen_noisy, policy_rejected, policy_rejected_noisy, lm_head, lm_head_bias: exactly
        those are written, in place (C-contiguous, the inputs' shape and dtype). Returns the Gradients.
        """
        if self._logits is None:
            raise _tpo.Error("backward: forward() must run first (and succeed)")
        if out is None:
            names = _GRADIENTS if self.noisy else ("policy_chosen", "policy_rejected")
            names += tuple(name for name in _HEAD_GRADIENTS if self._logits.get(name) is not None)
            targets = {name: _arrays.empty_like(self._logits[name]) for name in names}
        elif isinstance(out, Gradients):
            targets = {name: getattr(out, name) for name in Gradients.__slots__ if getattr(out, name) is not None}
        else:
            targets = {name: value for name, value in dict(out).items() if value is not None}
        unknown = set(targets) - set(Gradients.__slots__)
        if unknown:
            raise _tpo.ShapeError(f"backward: out names {sorted(unknown)}, expected some of {list(Gradients.__slots__)}")
        self._core.backward({name: _arrays.as_output(value, f"out['{name}']") for name, value in targets.items()})
        return Gradients(**targets)

    def release(self):
        """Lets go of the last forward's arrays (held so that backward reads what forward read)."""
        self._core.release()
        self._logits = None

    def evaluate(self, *args, out=None, **kwargs):
        """forward() then backward(out): (Result, Gradients)."""
        result = self.forward(*args, **kwargs)
        return result, self.backward(out)

    def __repr__(self):
        changed = {k: v for k, v in self.options.items() if v != _DEFAULTS.get(k)}
        return "tpo.Objective(" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")"


_DEFAULTS = dict(method="tpo", loss_type=["sigmoid"], loss_weights=None, beta=0.1, label_smoothing=0.0,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05, a=0.5,
                 score="logit", form="additive", average=False, detach_weights=False, shift=True, ignore_index=-100,
                 use_weighting=False, ld_alpha=None, check_inputs=True, check_unused_logits=True, logit_scale=1.0,
                 logit_softcap=None, temperature=1.0, chunk_tokens=None, backend="auto", threads=0)
