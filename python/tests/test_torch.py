"""tpo.torch against a plain-PyTorch implementation of the official TPO loss written here, and
PyTorch tensors read in place. Skipped where torch is not importable."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the tpo.torch tests need it")

import tpo  # noqa: E402
import tpo.torch  # noqa: E402
from tpo import _arrays, _tpo  # noqa: E402


def official_tpo_loss(policy, reference, labels, beta=0.1, a=0.5, ignore_index=-100):
    """TPO as the paper's code computes it, in plain PyTorch: per token ℓ = log_softmax(z)[y],
    s = z[y] − z̃[y], c = σ(s) + a (chosen) or 1 − σ(s) + a (rejected), A = Σ m·(ℓ + log c) with the
    causal shift, the reference model alike, then −log σ(β·h) averaged over pairs. `policy` and
    `reference` map (side, clean/noisy) to logits; `labels` maps side to labels."""

    def score(z, zn, y, chosen):
        y = y[:, 1:]
        z, zn = z[:, :-1], zn[:, :-1]
        mask = y != ignore_index
        index = torch.where(mask, y, torch.zeros_like(y)).unsqueeze(-1)
        logp = torch.log_softmax(z.double(), dim=-1).gather(-1, index).squeeze(-1)
        s = z.double().gather(-1, index).squeeze(-1) - zn.double().gather(-1, index).squeeze(-1)
        c = torch.sigmoid(s) + a if chosen else 1 - torch.sigmoid(s) + a
        return ((logp + torch.log(c)) * mask).sum(-1)

    def side_scores(model):
        return (score(model["chosen"], model["chosen_noisy"], labels["chosen"], True),
                score(model["rejected"], model["rejected_noisy"], labels["rejected"], False))

    policy_w, policy_l = side_scores(policy)
    with torch.no_grad():
        reference_w, reference_l = side_scores(reference)
    h = (policy_w - reference_w) - (policy_l - reference_l)
    return -torch.nn.functional.logsigmoid(beta * h).mean()


def random_models(pairs=3, lengths=(7, 6), vocab=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy, reference, labels = {}, {}, {}
    for side, length in zip(("chosen", "rejected"), lengths):
        for noisy in ("", "_noisy"):
            policy[side + noisy] = (2 * torch.randn(pairs, length, vocab, generator=g, dtype=torch.float64)).to(dtype)
            reference[side + noisy] = (2 * torch.randn(pairs, length, vocab, generator=g, dtype=torch.float64)).to(dtype)
        y = torch.randint(0, vocab, (pairs, length), generator=g)
        y[:, :2] = -100
        y[0, -1] = -100
        labels[side] = y
    return policy, reference, labels


def ours(policy, reference, labels, **options):
    return tpo.torch.tpo_loss(policy["chosen"], policy["chosen_noisy"], policy["rejected"], policy["rejected_noisy"],
                              reference["chosen"], reference["chosen_noisy"], reference["rejected"],
                              reference["rejected_noisy"], labels["chosen"], labels["rejected"], **options)


def leaves(policy):
    return {k: v.clone().requires_grad_(True) for k, v in policy.items()}


@pytest.mark.parametrize("beta,a", [(0.1, 0.5), (0.5, 0.0), (1.0, 1.0)])
def test_loss_and_gradients_match_the_official_loss_in_float64(beta, a):
    policy, reference, labels = random_models()
    mine, theirs = leaves(policy), leaves(policy)
    loss = ours(mine, reference, labels, beta=beta, a=a)
    want = official_tpo_loss(theirs, reference, labels, beta=beta, a=a)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    (loss * 3).backward()  # the incoming gradient scales ours
    (want * 3).backward()
    for k in mine:
        torch.testing.assert_close(mine[k].grad, theirs[k].grad, rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_16_and_32_bit_logits_against_the_official_loss_on_the_same_values(dtype):
    policy, reference, labels = random_models(dtype=dtype, seed=1)
    mine = leaves(policy)
    exact = {k: v.double().requires_grad_(True) for k, v in policy.items()}
    loss = ours(mine, reference, labels)
    want = official_tpo_loss(exact, {k: v.double() for k, v in reference.items()}, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    want.backward()
    eps = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}[dtype]
    for k in mine:
        assert mine[k].grad.dtype == dtype
        scale = exact[k].grad.abs().max().item()
        torch.testing.assert_close(mine[k].grad.double(), exact[k].grad, rtol=0, atol=2 * eps * scale, msg=k)


def test_the_loss_at_initialisation_is_ln2():
    policy, _, labels = random_models(dtype=torch.float32, seed=2)
    mine = leaves(policy)
    loss, result = ours(mine, {k: v.clone() for k, v in policy.items()}, labels, return_result=True)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-7)
    assert np.all(result.losses == math.log(2))
    loss.backward()
    assert all(t.grad is not None for t in mine.values())


def test_dpo_loss_matches_plain_dpo():
    policy, reference, labels = random_models(seed=3)
    mine = {k: policy[k].clone().requires_grad_(True) for k in ("chosen", "rejected")}
    loss = tpo.torch.dpo_loss(mine["chosen"], mine["rejected"], reference["chosen"], reference["rejected"],
                              labels["chosen"], labels["rejected"], beta=0.2)

    def logps(z, y):
        y = y[:, 1:]
        mask = y != -100
        index = torch.where(mask, y, torch.zeros_like(y)).unsqueeze(-1)
        return (torch.log_softmax(z[:, :-1], -1).gather(-1, index).squeeze(-1) * mask).sum(-1)

    theirs = {k: policy[k].clone().requires_grad_(True) for k in ("chosen", "rejected")}
    h = (logps(theirs["chosen"], labels["chosen"]) - logps(reference["chosen"], labels["chosen"])) - (
        logps(theirs["rejected"], labels["rejected"]) - logps(reference["rejected"], labels["rejected"]))
    want = -torch.nn.functional.logsigmoid(0.2 * h).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    loss.backward()
    want.backward()
    for k in mine:
        torch.testing.assert_close(mine[k].grad, theirs[k].grad, rtol=1e-9, atol=1e-12)


def test_no_gradient_is_computed_or_kept_without_requires_grad():
    policy, reference, labels = random_models(seed=4)
    loss = ours(policy, reference, labels)
    assert not loss.requires_grad
    with torch.no_grad():
        assert not ours(leaves(policy), reference, labels).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_tensors_are_read_in_place(dtype):
    t = torch.zeros(2, 3, 5, dtype=dtype, requires_grad=True)
    seen = _tpo.inspect(_arrays.as_input(t))
    assert seen["data"] == t.data_ptr() and seen["dtype"] == str(dtype).replace("torch.", "")


def test_non_contiguous_tensors_are_handled():
    policy, reference, labels = random_models(seed=5)
    transposed = {k: v.transpose(0, 1).contiguous().transpose(0, 1) for k, v in policy.items()}
    assert not transposed["chosen"].is_contiguous()
    mine = leaves(transposed)
    mine = {k: v.transpose(0, 1).contiguous().transpose(0, 1).detach().requires_grad_(True) for k, v in mine.items()}
    loss = ours(mine, reference, labels)
    want = ours(leaves(policy), reference, labels)
    assert loss.item() == want.item()
    loss.backward()
    assert mine["chosen"].grad.shape == mine["chosen"].shape


def test_numpy_and_torch_give_the_same_results():
    policy, reference, labels = random_models(dtype=torch.float32, seed=6)
    t = tpo.Objective().forward(policy["chosen"], policy["chosen_noisy"], policy["rejected"], policy["rejected_noisy"],
                                reference["chosen"], reference["chosen_noisy"], reference["rejected"],
                                reference["rejected_noisy"], labels["chosen"], labels["rejected"])
    n = tpo.Objective().forward(*(x.numpy() for x in (policy["chosen"], policy["chosen_noisy"], policy["rejected"],
                                                      policy["rejected_noisy"], reference["chosen"],
                                                      reference["chosen_noisy"], reference["rejected"],
                                                      reference["rejected_noisy"], labels["chosen"],
                                                      labels["rejected"])))
    assert t.loss == n.loss


def test_torch_bfloat16_and_ml_dtypes_bfloat16_agree():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed")
    policy, reference, labels = random_models(dtype=torch.bfloat16, seed=7)
    order = ("chosen", "chosen_noisy", "rejected", "rejected_noisy")
    args = [policy[k] for k in order] + [reference[k] for k in order] + [labels["chosen"], labels["rejected"]]
    as_numpy = [x.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if x.dtype == torch.bfloat16 else x.numpy()
                for x in args]
    a, b = tpo.Objective(), tpo.Objective()
    assert a.forward(*args).loss == b.forward(*as_numpy).loss
    ga, gb = a.backward(), b.backward()
    assert ga.policy_chosen.dtype == torch.bfloat16 and gb.policy_chosen.dtype == ml_dtypes.bfloat16
    assert np.array_equal(ga.policy_chosen.view(torch.int16).numpy(), gb.policy_chosen.view(np.int16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_against_the_cpu():
    if "cuda" not in tpo.backends:
        pytest.skip("this package was built without CUDA")
    policy, reference, labels = random_models(dtype=torch.float32, seed=8)
    on = lambda d: {k: v.cuda() for k, v in d.items()}  # noqa: E731
    gpu, cpu = leaves(on(policy)), leaves(policy)
    loss = ours(gpu, on(reference), on(labels))
    want = ours(cpu, reference, labels)
    assert loss.is_cuda and loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    want.backward()
    for k in gpu:
        torch.testing.assert_close(gpu[k].grad.cpu(), cpu[k].grad, rtol=1e-4, atol=1e-6)
    image = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(tpo.corrupt.diffusion(image.cuda(), seed=3).cpu(), tpo.corrupt.diffusion(image, seed=3),
                               rtol=0, atol=1e-5)


def test_concatenated_batches_give_the_split_results():
    policy, reference, labels = random_models(lengths=(7, 7), seed=9)
    cat = lambda d, a, b: torch.cat([d[a], d[b]])  # noqa: E731
    z = cat(policy, "chosen", "rejected").requires_grad_(True)
    zn = cat(policy, "chosen_noisy", "rejected_noisy").requires_grad_(True)
    loss, result = tpo.torch.tpo_loss_concatenated(z, zn, cat(reference, "chosen", "rejected"),
                                                   cat(reference, "chosen_noisy", "rejected_noisy"),
                                                   cat(labels, "chosen", "rejected"), return_result=True)
    split = leaves(policy)
    want = ours(split, reference, labels)
    assert loss.item() == want.item() and result.loss == want.item()
    (2 * loss).backward()
    (2 * want).backward()
    torch.testing.assert_close(z.grad, torch.cat([split["chosen"].grad, split["rejected"].grad]), rtol=0, atol=0)
    torch.testing.assert_close(zn.grad, torch.cat([split["chosen_noisy"].grad, split["rejected_noisy"].grad]),
                               rtol=0, atol=0)
    with pytest.raises(tpo.ShapeError, match="expected an even number"):
        tpo.torch.tpo_loss_concatenated(z[:3], zn[:3], z[:3], zn[:3], labels["chosen"][:3])


def test_hidden_states_give_the_logits_results():
    g = torch.Generator().manual_seed(10)
    S, L, H, V = 4, 6, 5, 11
    h, hn, r, rn = (torch.randn(S, L, H, generator=g, dtype=torch.float64) for _ in range(4))
    W, b, W_ref = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((V, H), (V,), (V, H)))
    y = torch.randint(0, V, (S, L), generator=g)
    y[:, :2] = -100
    leaves_h = [t.clone().requires_grad_(True) for t in (h, hn, W, b)]
    loss = tpo.torch.tpo_loss_hidden_concatenated(leaves_h[0], leaves_h[1], r, rn, y, lm_head=leaves_h[2],
                                                  lm_head_bias=leaves_h[3], reference_lm_head=W_ref,
                                                  logit_softcap=5.0)
    leaves_z = [t.clone().requires_grad_(True) for t in (h, hn, W, b)]

    def logits(x, weight, bias):
        return 5.0 * torch.tanh((x @ weight.T + bias) / 5.0)

    want = tpo.torch.tpo_loss_concatenated(logits(leaves_z[0], leaves_z[2], leaves_z[3]),
                                           logits(leaves_z[1], leaves_z[2], leaves_z[3]), logits(r, W_ref, 0),
                                           logits(rn, W_ref, 0), y)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    (3 * loss).backward()
    (3 * want).backward()
    for mine, theirs in zip(leaves_h, leaves_z):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-12)
