"""Image corruptions (the library's tpo::add_diffusion_noise and the others), on NumPy arrays and
PyTorch tensors (CPU, or CUDA in a CUDA build), in place of the caller's memory.

An image is (..., C, H, W) (layout="chw", the default, as PyTorch holds images) or (..., H, W, C)
(layout="hwc", as PIL and NumPy image files hold them); a 2-d array is one channel. Leading axes
are a batch. Any dense memory order works (a permuted tensor is read where it lies): the noise of an
element is keyed by its memory offset (Philox, seed and stream), so the same image gives the same
noise on every backend and with any number of threads. uint8 images are read as x/255 and written
back clamped and rounded (wrap=True: the official code's wrap-around cast); float images (float32,
float64, bfloat16, float16) are taken as they are.

Each function returns `out`: a new array like the image, or the caller's (same shape, dtype and
memory order; it may be the image itself, except for crop).
"""

from . import _arrays, _tpo

_DEFAULTS = dict(step=500, schedule="sigmoid", steps=1000, beta_start=None, beta_end=None, zero_snr=False, seed=0,
                 stream=0, space="pixel", wrap=False, min_area=0.01, max_area=0.20, min_aspect=3 / 4,
                 max_aspect=4 / 3, kernel_size=13, min_sigma=1.5, max_sigma=2.0, patch_size=14, ratio=0.5,
                 threads=0)


def _run(kind, image, out, layout, **options):
    if out is None:
        out = _arrays.empty_image_like(image)
    settings = dict(_DEFAULTS)
    settings.update(options)
    _tpo.corrupt(kind, _arrays.as_image(image), _arrays.as_image(out), layout=layout,
                 cuda_stream=_arrays.cuda_stream(image, out), **settings)
    return out


def diffusion(image, step=500, *, schedule="sigmoid", steps=1000, beta_start=None, beta_end=None, zero_snr=False,
              seed=0, stream=0, space="pixel", wrap=False, layout="chw", out=None, threads=0):
    """Forward diffusion noise: sqrt(ᾱ_k)·x + sqrt(1 − ᾱ_k)·ε, the official TPO corruption.

    step: k in [0, steps); schedule: "sigmoid" (official TPO, VCD), "linear", "scaled_linear" or
    "cosine", with the schedule's default beta range unless beta_start/beta_end are given;
    zero_snr: the zero-terminal-SNR rescale. space: "pixel" (on the values as stored, as official
    TPO) or "normalized" (on the CLIP-normalised values, as VCD and CHiP). seed, stream: the noise's
    Philox key and stream (e.g. the image's index in the data set).
    """
    return _run("diffusion", image, out, layout, step=int(step), schedule=schedule, steps=int(steps),
                beta_start=beta_start, beta_end=beta_end, zero_snr=bool(zero_snr), seed=int(seed), stream=int(stream),
                space=space, wrap=bool(wrap), threads=int(threads))


def crop(image, *, min_area=0.01, max_area=0.20, min_aspect=3 / 4, max_aspect=4 / 3, seed=0, stream=0, wrap=False,
         layout="chw", out=None, threads=0):
    """mDPO's random resized crop: a box of [min_area, max_area] of the image, resized back bilinearly.
    `out` must not overlap the image. Image n of a batch uses stream + n."""
    return _run("crop", image, out, layout, min_area=float(min_area), max_area=float(max_area),
                min_aspect=float(min_aspect), max_aspect=float(max_aspect), seed=int(seed), stream=int(stream),
                wrap=bool(wrap), threads=int(threads))


def blur(image, *, kernel_size=13, min_sigma=1.5, max_sigma=2.0, seed=0, stream=0, wrap=False, layout="chw",
         out=None, threads=0):
    """RITUAL's Gaussian blur: an odd kernel, σ drawn in [min_sigma, max_sigma] per image."""
    return _run("blur", image, out, layout, kernel_size=int(kernel_size), min_sigma=float(min_sigma),
                max_sigma=float(max_sigma), seed=int(seed), stream=int(stream), wrap=bool(wrap), threads=int(threads))


def patch_mask(image, *, patch_size=14, ratio=0.5, seed=0, stream=0, wrap=False, layout="chw", out=None, threads=0):
    """Each patch_size² patch replaced by the CLIP mean colour with probability `ratio`."""
    return _run("patch_mask", image, out, layout, patch_size=int(patch_size), ratio=float(ratio), seed=int(seed),
                stream=int(stream), wrap=bool(wrap), threads=int(threads))


def mean(image, *, wrap=False, layout="chw", out=None, threads=0):
    """The mean-colour image (zero once CLIP-normalised; V-DPO and CHiP's "black" image), shaped like `image`."""
    if out is None:
        out = _arrays.empty_image_like(image)
    return _run("mean", out, out, layout, wrap=bool(wrap), threads=int(threads))


def noise(image, *, seed=0, stream=0, wrap=False, layout="chw", out=None, threads=0):
    """Pure Gaussian noise in normalised space (ε·std_c + mean_c), shaped like `image`."""
    if out is None:
        out = _arrays.empty_image_like(image)
    return _run("noise", out, out, layout, seed=int(seed), stream=int(stream), wrap=bool(wrap), threads=int(threads))


def alpha_bars(schedule="sigmoid", steps=1000, *, beta_start=None, beta_end=None, zero_snr=False):
    """ᾱ_k for k = 0 … steps − 1 (float64), as the diffusion noise uses them."""
    return _tpo.alpha_bars(schedule=schedule, steps=int(steps), beta_start=beta_start, beta_end=beta_end,
                           zero_snr=bool(zero_snr))
