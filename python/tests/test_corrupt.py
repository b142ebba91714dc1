"""tpo.corrupt against the `tpo corrupt` tool on the same .npy images (bit for bit: one library),
against the schedule's reference figures, and on 8-bit and permuted images."""

import numpy as np
import pytest

import tpo
from tpo import corrupt


def image(rng, shape=(2, 3, 20, 24), dtype=np.float32):
    return rng.uniform(0, 1, shape).astype(dtype)


CASES = [
    ("diffusion", {}, []),
    ("diffusion", dict(step=999, schedule="cosine", seed=7, stream=3), ["--step", "999", "--schedule", "cosine",
                                                                       "--seed", "7", "--stream", "3"]),
    ("diffusion", dict(step=100, schedule="linear", space="normalized", zero_snr=True),
     ["--step", "100", "--schedule", "linear", "--space", "normalized", "--zero-snr"]),
    ("diffusion", dict(step=10, steps=50, schedule="scaled_linear", beta_start=0.001, beta_end=0.02),
     ["--step", "10", "--steps", "50", "--schedule", "scaled_linear", "--beta-start", "0.001", "--beta-end", "0.02"]),
    ("crop", dict(seed=4), ["--seed", "4"]),
    ("blur", dict(seed=5, stream=1), ["--seed", "5", "--stream", "1"]),
    ("patch_mask", dict(seed=6), ["--seed", "6"]),
    ("mean", {}, []),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f4", "f8"])
@pytest.mark.parametrize("kind,options,flags", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_corruptions_match_the_tool(tool, tmp_path, kind, options, flags, dtype):
    rng = np.random.default_rng(1)
    x = image(rng, dtype=dtype)
    np.save(tmp_path / "in.npy", x)
    tool("corrupt", "--in", tmp_path / "in.npy", "--out", tmp_path / "out.npy", "--kind", kind.replace("_", "-"),
         *flags)
    want = np.load(tmp_path / "out.npy")
    got = getattr(corrupt, kind)(x, **options)
    assert got.dtype == x.dtype and got.shape == x.shape
    # The tool runs the reference backend; the package the CPU backend's vectorised Philox and
    # Box–Muller, which agree within a few ulps (the library's own tests bound them).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-5)


def test_the_sigmoid_schedule_gives_the_reference_figures():
    a = corrupt.alpha_bars()
    assert a.shape == (1000,)
    assert a[500] == pytest.approx(0.744798526, abs=1e-9)
    for k, want in ((0, 0.999978), (100, 0.996589), (999, 0.081249)):
        assert a[k] == pytest.approx(want, abs=1e-6)


def test_diffusion_noise_has_the_schedules_strength():
    x = np.full((1, 3, 256, 256), 0.5, np.float32)
    y = corrupt.diffusion(x, step=500, seed=1)
    a = corrupt.alpha_bars()[500]
    noise = (y - np.sqrt(a) * x) / np.sqrt(1 - a)
    assert abs(noise.mean()) < 0.01 and noise.std() == pytest.approx(1.0, abs=0.01)


def test_in_place_and_into_out():
    rng = np.random.default_rng(2)
    x = image(rng)
    want = corrupt.diffusion(x, seed=9)
    out = np.empty_like(x)
    assert corrupt.diffusion(x, seed=9, out=out) is out
    np.testing.assert_array_equal(out, want)
    y = x.copy()
    corrupt.diffusion(y, seed=9, out=y)
    np.testing.assert_array_equal(y, want)
    with pytest.raises(tpo.ShapeError, match="overlaps the image"):
        corrupt.crop(y, out=y)
    with pytest.raises(tpo.ShapeError, match="overlaps the image without being it"):
        z = np.zeros(x.size + 4, np.float32)
        corrupt.diffusion(z[:x.size].reshape(x.shape), out=z[4:].reshape(x.shape))


def test_uint8_images_are_corrupted_as_x_over_255_then_clamped_and_rounded():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    as_float = x.astype(np.float32) * np.float32(1 / 255)  # how the library reads an 8-bit pixel
    noisy = corrupt.diffusion(as_float, seed=2)
    want = np.floor(np.clip(noisy * np.float32(255), 0, 255) + np.float32(0.5)).astype(np.uint8)
    got = corrupt.diffusion(x, seed=2)
    assert got.dtype == np.uint8
    assert np.mean(got != want) < 1e-3 and np.all(np.abs(got.astype(int) - want) <= 1)
    wrapped = corrupt.diffusion(x, seed=2, wrap=True)
    scaled = np.trunc(noisy.astype(np.float32) * np.float32(255)).astype(np.int64)
    assert np.mean(wrapped != (scaled % 256).astype(np.uint8)) < 1e-3


def test_layouts_follow_memory_order():
    rng = np.random.default_rng(4)
    hwc = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    # The same memory seen as (C, H, W) through strides: same noise, element by element.
    chw_view = hwc.transpose(2, 0, 1)
    a = corrupt.diffusion(hwc, layout="hwc", seed=1, space="normalized")
    b = corrupt.diffusion(chw_view, layout="chw", seed=1, space="normalized")
    np.testing.assert_array_equal(a, b.transpose(1, 2, 0))
    assert b.strides == chw_view.strides  # the result keeps the image's memory order


def test_bad_images_are_refused_clearly():
    with pytest.raises(tpo.ShapeError, match="dtype int16"):
        corrupt.diffusion(np.zeros((3, 4, 4), np.int16))
    with pytest.raises(tpo.InvalidValueError, match="step = 1000"):
        corrupt.diffusion(np.zeros((3, 4, 4), np.float32), step=1000)
    with pytest.raises(tpo.InvalidValueError, match="unknown noise space"):
        corrupt.diffusion(np.zeros((3, 4, 4), np.float32), space="lab")
    with pytest.raises(tpo.ShapeError, match="dense layout"):
        corrupt.diffusion(np.zeros((3, 8, 8), np.float32)[:, ::2, :])
    with pytest.raises(tpo.ShapeError, match="out: dtype float64, expected float32"):
        corrupt.diffusion(np.zeros((3, 4, 4), np.float32), out=np.zeros((3, 4, 4)))
    with pytest.raises(tpo.InvalidValueError, match="odd"):
        corrupt.blur(np.zeros((3, 4, 4), np.float32), kernel_size=4)
