"""tpo.Objective against the `tpo` tool (`tpo loss --dir D --grad-dir G`) on the same .npy files:
every loss type and every option, float32 and float64, both backends of the package."""

import zlib

import numpy as np
import pytest

import tpo
from conftest import make_batch, save_batch

LOSS_TYPES = ["sigmoid", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft"]

# (Objective keyword arguments) per case; the tool gets the same as flags.
CASES = [dict(loss_type=t, **({"label_smoothing": 0.1} if t == "exo_pair" else {})) for t in LOSS_TYPES] + [
    dict(method="dpo", loss_type=t, **({"label_smoothing": 0.2} if t == "exo_pair" else {})) for t in LOSS_TYPES
] + [
    dict(loss_type="sigmoid", label_smoothing=0.2),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="aot", label_smoothing=0.1),
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    dict(loss_type="ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="sigmoid_norm", f_divergence_type="alpha_divergence"),
    dict(loss_type="discopop", discopop_tau=0.5),
    dict(beta=0.5),
    dict(a=0.0),
    dict(a=1.0),
    dict(score="prob"),
    dict(score="logprob"),
    dict(form="multiplicative"),
    dict(form="multiplicative", score="prob", detach_weights=True),
    dict(average=True),
    dict(detach_weights=True),
    dict(shift=False),
    dict(ignore_index=-1),
    dict(use_weighting=True),
    dict(loss_type=["sigmoid", "sft"], use_weighting=True, loss_weights=[1.0, 0.5]),
    dict(ld_alpha=0.5),
    dict(method="dpo", ld_alpha=0.0, loss_type="ipo"),
    dict(loss_type="sigmoid,bco_pair,sft", loss_weights=[0.8, 0.2, 1.0]),
    dict(method="dpo", loss_type=["apo_zero", "sft"], loss_weights=[1.0, 0.3], average=True),
]


def flags(options):
    out = []
    for key, value in options.items():
        if key == "loss_type":
            out += ["--loss", value if isinstance(value, str) else ",".join(value)]
        elif key == "loss_weights":
            out += ["--loss-weights", ",".join(str(w) for w in value)]
        elif key == "shift":
            out += [] if value else ["--no-shift"]
        elif isinstance(value, bool):
            out += [f"--{key.replace('_', '-')}"] if value else []
        else:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def case_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items()).replace(" ", "")


@pytest.mark.parametrize("options", CASES, ids=[case_id(c) for c in CASES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f8", "f4"])
def test_forward_and_gradients_match_the_tool(tool, tmp_path, options, dtype):
    rng = np.random.default_rng(zlib.crc32(case_id(options).encode()))
    noisy = options.get("method", "tpo") == "tpo"
    batch = make_batch(rng, dtype=dtype, noisy=noisy)
    if options.get("ignore_index") == -1:
        for side in ("chosen", "rejected"):
            batch[f"labels_{side}"][batch[f"labels_{side}"] == -100] = -1
    directory = save_batch(tmp_path / "dump", batch)
    expected = tool.json("loss", "--dir", directory, "--grad-dir", tmp_path / "grads", "--backend", "reference",
                         *flags(options))
    expected_grads = {name: np.load(tmp_path / "grads" / f"grad_{name}.npy")
                      for name in ("policy_chosen", "policy_rejected")
                      + (("policy_chosen_noisy", "policy_rejected_noisy") if noisy else ())}

    # The reference backend is the tool's own arithmetic (up to the compiler's contractions); the CPU
    # backend accumulates float rows in float blocks.
    for backend, rtol in (("reference", 1e-10), ("cpu", 1e-9 if dtype == np.float64 else 2e-5)):
        if backend not in tpo.backends:
            continue
        objective = tpo.Objective(backend=backend, **options)
        result = objective.forward(**batch)
        assert result.loss == pytest.approx(expected["loss"], rel=rtol, abs=rtol)
        for key in ("losses", "chosen_rewards", "rejected_rewards", "policy_chosen_scores", "policy_rejected_scores",
                    "mean_visual_score_chosen", "mean_visual_score_rejected"):
            np.testing.assert_allclose(getattr(result, key), expected[key], rtol=rtol, atol=rtol, err_msg=key)
        assert result.reward_accuracy == pytest.approx(expected["reward_accuracy"])
        assert result.reward_margin == pytest.approx(expected["reward_margin"], rel=rtol, abs=rtol)
        grads = objective.backward()
        for name, want in expected_grads.items():
            got = getattr(grads, name)
            assert got.dtype == want.dtype and got.shape == want.shape
            scale = np.abs(want).max() + 1e-30
            np.testing.assert_allclose(got, want, rtol=0, atol=(1e-9 if dtype == np.float64 else 2e-6) * scale,
                                       err_msg=f"{backend} {name}")


def test_the_tool_and_the_package_refuse_the_same_options(tool, tmp_path):
    rng = np.random.default_rng(5)
    directory = save_batch(tmp_path / "dump", make_batch(rng))
    for options in (dict(beta=-1.0), dict(loss_type="exo_pair"), dict(a=-0.5), dict(ld_alpha=1.5),
                    dict(loss_type="aot", use_weighting=True)):
        done = tool("loss", "--dir", directory, *flags(options), check=False)
        assert done.returncode == 2
        with pytest.raises(tpo.InvalidValueError) as raised:
            tpo.Objective(**options)
        # The library's own message, which the tool prints after its prefix.
        assert str(raised.value) in done.stderr
