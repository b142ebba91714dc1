"""tpo.torch: the library's objective as a differentiable PyTorch function (pure Python over the
extension module; no libtorch is linked).

    import tpo.torch
    loss = tpo.torch.tpo_loss(policy_chosen, policy_chosen_noisy, policy_rejected, policy_rejected_noisy,
                              reference_chosen, reference_chosen_noisy, reference_rejected,
                              reference_rejected_noisy, labels_chosen, labels_rejected, beta=0.1)
    loss.backward()

Logits are (P, L, V) tensors of float32, float64, bfloat16 or float16 (CPU, or CUDA in a CUDA
build), labels (P, L) int64 or int32. The forward computes the loss and, when a policy tensor
requires grad, its exact gradient in the same call (one more pass over the logits, no softmax is
stored); backward hands those gradients to autograd, scaled by the incoming gradient. The
gradients are held from forward to backward: the same memory PyTorch's own log_softmax would keep.
The reference logits are constants (no gradient flows into them), as are labels, token weights
and reference scores.
"""

import torch

from . import _tpo
from ._objective import Objective

_POLICY = ("policy_chosen", "policy_chosen_noisy", "policy_rejected", "policy_rejected_noisy")


class PreferenceFunction(torch.autograd.Function):
    """apply(objective, result_sink, pc, pcn, pr, prn, rc, rcn, rr, rrn, yc, yr, wc, wr, sc, sr) → loss."""

    @staticmethod
    def forward(ctx, objective, sink, pc, pcn, pr, prn, rc, rcn, rr, rrn, yc, yr, wc, wr, sc, sr):
        result = objective.forward(pc, pcn, pr, prn, rc, rcn, rr, rrn, yc, yr, weights_chosen=wc,
                                   weights_rejected=wr, reference_chosen_scores=sc, reference_rejected_scores=sr)
        policy = (pc, pcn, pr, prn)
        wanted = {name: t for name, t, need in zip(_POLICY, policy, ctx.needs_input_grad[2:6]) if need}
        grads = {}
        if wanted:
            grads = {name: torch.empty_like(t, memory_format=torch.contiguous_format) for name, t in wanted.items()}
            objective.backward(out=grads)
        objective.release()
        ctx.grads = tuple(grads.get(name) for name in _POLICY)
        if sink is not None:
            sink.append(result)
        dtype = torch.float64 if pc.dtype == torch.float64 else torch.float32
        return torch.tensor(result.loss, dtype=dtype, device=pc.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        _scale(grads, grad_loss)
        return (None, None) + grads + (None,) * 10


class ConcatenatedPreferenceFunction(torch.autograd.Function):
    """apply(objective, result_sink, z, zn, r, rn, y, w, s) → loss, on batches that hold the chosen
    rows first and the rejected rows after them (TRL's concatenated forward)."""

    @staticmethod
    def forward(ctx, objective, sink, z, zn, r, rn, y, w, s):
        if z.shape[0] % 2:
            raise _tpo.ShapeError(f"policy: {z.shape[0]} sequences, expected an even number (chosen rows, "
                                  "then as many rejected rows)")
        pairs = z.shape[0] // 2

        def halves(t):
            return (None, None) if t is None else (t[:pairs], t[pairs:])

        (zc, zr), (znc, znr), (rc, rr), (rnc, rnr), (yc, yr), (wc, wr), (sc, sr) = map(halves, (z, zn, r, rn, y, w, s))
        result = objective.forward(zc, znc, zr, znr, rc, rnc, rr, rnr, yc, yr, weights_chosen=wc, weights_rejected=wr,
                                   reference_chosen_scores=sc, reference_rejected_scores=sr)
        # One gradient tensor per input, its halves written in place: no concatenation afterwards.
        grads = [torch.empty_like(t, memory_format=torch.contiguous_format) if need else None
                 for t, need in zip((z, zn), ctx.needs_input_grad[2:4])]
        out = {}
        for g, name in zip(grads, ("policy", "policy_noisy")):
            if g is not None:
                out[name.replace("policy", "policy_chosen")] = g[:pairs]
                out[name.replace("policy", "policy_rejected")] = g[pairs:]
        if out:
            objective.backward(out=out)
        objective.release()
        ctx.grads = tuple(grads)
        if sink is not None:
            sink.append(result)
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        return torch.tensor(result.loss, dtype=dtype, device=z.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        _scale(grads, grad_loss)
        return (None, None) + grads + (None,) * 5


class HiddenConcatenatedFunction(torch.autograd.Function):
    """apply(objective, result_sink, h, hn, r, rn, y, head, bias, reference_head, reference_bias, w, s)
    → loss: concatenated batches of last hidden states and the lm_head (the fused lm_head path),
    differentiable in the policy's states and in the head's weight and bias."""

    @staticmethod
    def forward(ctx, objective, sink, h, hn, r, rn, y, head, bias, reference_head, reference_bias, w, s):
        if h.shape[0] % 2:
            raise _tpo.ShapeError(f"policy: {h.shape[0]} sequences, expected an even number (chosen rows, "
                                  "then as many rejected rows)")
        pairs = h.shape[0] // 2

        def halves(t):
            return (None, None) if t is None else (t[:pairs], t[pairs:])

        (hc, hr), (hnc, hnr), (rc, rr), (rnc, rnr), (yc, yr), (wc, wr), (sc, sr) = map(halves, (h, hn, r, rn, y, w, s))
        result = objective.forward_hidden(hc, hnc, hr, hnr, rc, rnc, rr, rnr, yc, yr, lm_head=head, lm_head_bias=bias,
                                          reference_lm_head=reference_head, reference_lm_head_bias=reference_bias,
                                          weights_chosen=wc, weights_rejected=wr, reference_chosen_scores=sc,
                                          reference_rejected_scores=sr)
        needs = ctx.needs_input_grad
        wanted = {2: h, 3: hn, 7: head, 8: bias}
        grads = {k: torch.empty_like(t, memory_format=torch.contiguous_format)
                 for k, t in wanted.items() if t is not None and needs[k]}
        out = {}
        for k, name in ((2, "policy"), (3, "policy_noisy")):
            if k in grads:
                out[name.replace("policy", "policy_chosen")] = grads[k][:pairs]
                out[name.replace("policy", "policy_rejected")] = grads[k][pairs:]
        if 7 in grads:
            out["lm_head"] = grads[7]
        if 8 in grads:
            out["lm_head_bias"] = grads[8]
        if out:
            objective.backward(out=out)
        objective.release()
        ctx.grads = tuple(grads.get(k) for k in (2, 3, 7, 8))
        if sink is not None:
            sink.append(result)
        dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        return torch.tensor(result.loss, dtype=dtype, device=h.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        _scale(grads, grad_loss)
        g_h, g_hn, g_head, g_bias = grads
        return (None, None, g_h, g_hn, None, None, None, g_head, g_bias, None, None, None, None)


def _scale(grads, grad_loss):
    if grad_loss.is_cuda or float(grad_loss) != 1.0:  # a CUDA check would wait for the device
        for g in grads:
            if g is not None:
                g.mul_(grad_loss)


def _objective(objective, options):
    if objective is None:
        options.setdefault("threads", torch.get_num_threads())
        return Objective(**options)
    if options:
        raise TypeError(f"options {sorted(options)} given with an objective; set them on it")
    return objective


def preference_loss(policy_chosen, policy_chosen_noisy=None, policy_rejected=None, policy_rejected_noisy=None,
                    reference_chosen=None, reference_chosen_noisy=None, reference_rejected=None,
                    reference_rejected_noisy=None, labels_chosen=None, labels_rejected=None, *, weights_chosen=None,
                    weights_rejected=None, reference_chosen_scores=None, reference_rejected_scores=None,
                    objective=None, return_result=False, **options):
    """The objective's batch loss as a 0-d tensor (float64 for float64 logits, else float32).

    objective: a tpo.Objective to use (its options); otherwise one is made from **options (those of
    tpo.Objective; threads defaults to torch.get_num_threads()). return_result=True returns
    (loss, tpo.Result) with the per-pair rewards, scores and metrics.
    """
    objective = _objective(objective, options)
    sink = [] if return_result else None
    loss = PreferenceFunction.apply(objective, sink, policy_chosen, policy_chosen_noisy, policy_rejected,
                                    policy_rejected_noisy, reference_chosen, reference_chosen_noisy, reference_rejected,
                                    reference_rejected_noisy, labels_chosen, labels_rejected, weights_chosen,
                                    weights_rejected, reference_chosen_scores, reference_rejected_scores)
    return (loss, sink[0]) if return_result else loss


def tpo_loss(policy_chosen, policy_chosen_noisy, policy_rejected, policy_rejected_noisy, reference_chosen=None,
             reference_chosen_noisy=None, reference_rejected=None, reference_rejected_noisy=None, labels_chosen=None,
             labels_rejected=None, **kwargs):
    """TPO's loss (method "tpo"; the official settings by default: sigmoid, β = 0.1, a = 0.5, logit
    score, additive). The reference enters through its clean and noisy logits, or through
    reference_chosen_scores / reference_rejected_scores. Other keywords: see preference_loss."""
    if "objective" not in kwargs:
        kwargs.setdefault("method", "tpo")
    return preference_loss(policy_chosen, policy_chosen_noisy, policy_rejected, policy_rejected_noisy,
                           reference_chosen, reference_chosen_noisy, reference_rejected, reference_rejected_noisy,
                           labels_chosen, labels_rejected, **kwargs)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen=None, reference_rejected=None, labels_chosen=None,
             labels_rejected=None, **kwargs):
    """The DPO family without token weights (method "dpo"); loss_type and the rest as tpo.Objective."""
    if "objective" not in kwargs:
        kwargs.setdefault("method", "dpo")
    return preference_loss(policy_chosen, None, policy_rejected, None, reference_chosen, None, reference_rejected,
                           None, labels_chosen, labels_rejected, **kwargs)


def preference_loss_concatenated(policy, policy_noisy=None, reference=None, reference_noisy=None, labels=None, *,
                                 weights=None, reference_scores=None, objective=None, return_result=False, **options):
    """preference_loss on concatenated batches: each tensor holds the P chosen rows, then the P
    rejected rows, as TRL's DPOTrainer runs them (one forward over 2P sequences). The halves are
    read in place, and each gradient is one tensor of the input's shape, so autograd adds no
    concatenation or slicing pass."""
    objective = _objective(objective, options)
    sink = [] if return_result else None
    loss = ConcatenatedPreferenceFunction.apply(objective, sink, policy, policy_noisy, reference, reference_noisy,
                                                labels, weights, reference_scores)
    return (loss, sink[0]) if return_result else loss


def tpo_loss_concatenated(policy, policy_noisy, reference=None, reference_noisy=None, labels=None, **kwargs):
    """tpo_loss on concatenated batches (chosen rows, then rejected rows): see preference_loss_concatenated."""
    if "objective" not in kwargs:
        kwargs.setdefault("method", "tpo")
    return preference_loss_concatenated(policy, policy_noisy, reference, reference_noisy, labels, **kwargs)


def preference_loss_hidden_concatenated(hidden, hidden_noisy=None, reference_hidden=None,
                                        reference_hidden_noisy=None, labels=None, *, lm_head, lm_head_bias=None,
                                        reference_lm_head=None, reference_lm_head_bias=None, weights=None,
                                        reference_scores=None, objective=None, return_result=False, **options):
    """preference_loss_concatenated with the last hidden states (2P, L, H) and the lm_head weight
    (V, H) (+ bias) in place of the logits: the logits are computed inside the library a chunk of
    rows at a time and never stored whole. Differentiable in the policy's states and in lm_head and
    lm_head_bias (reference states and head are constants)."""
    objective = _objective(objective, options)
    sink = [] if return_result else None
    loss = HiddenConcatenatedFunction.apply(objective, sink, hidden, hidden_noisy, reference_hidden,
                                            reference_hidden_noisy, labels, lm_head, lm_head_bias, reference_lm_head,
                                            reference_lm_head_bias, weights, reference_scores)
    return (loss, sink[0]) if return_result else loss


def tpo_loss_hidden_concatenated(hidden, hidden_noisy, reference_hidden=None, reference_hidden_noisy=None,
                                 labels=None, **kwargs):
    """TPO's loss from hidden states: see preference_loss_hidden_concatenated."""
    if "objective" not in kwargs:
        kwargs.setdefault("method", "tpo")
    return preference_loss_hidden_concatenated(hidden, hidden_noisy, reference_hidden, reference_hidden_noisy, labels,
                                               **kwargs)
