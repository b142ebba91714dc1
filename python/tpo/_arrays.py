"""Arrays on their way into the extension module: read in place where they can be.

NumPy arrays and PyTorch tensors (CPU or CUDA) reach the C++ core as they are, without a copy.
Two cases need a word first:
- NumPy has no bfloat16; ml_dtypes' bfloat16 arrays are passed as their 16-bit pattern together
  with the name of the type (the core reads them as bfloat16, in place).
- A tensor that requires grad is passed detached (same memory): DLPack refuses such tensors.
Inputs that are not C-contiguous are copied once into a contiguous array (the only copy this
package makes of a tensor); outputs must be C-contiguous, since results written into a copy would
be lost.
"""

import numpy as np

from . import _tpo


def is_torch(x):
    return type(x).__module__.startswith("torch")


def is_numpy_bfloat16(x):
    return isinstance(x, np.ndarray) and x.dtype.name == "bfloat16"


def _c_contiguous(x):
    if isinstance(x, np.ndarray):
        return x.flags.c_contiguous
    if is_torch(x):
        return x.is_contiguous()
    return True  # other DLPack producers: the core checks and names the array


def as_input(x):
    """`x` as the core takes an input: in place where possible (see the module's docstring)."""
    if x is None:
        return None
    if is_torch(x):
        if x.requires_grad:
            x = x.detach()
        if not x.is_contiguous():
            x = x.contiguous()
        return x
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        if x.dtype.name == "bfloat16":
            return (x.view(np.uint16), "bfloat16")
        return x
    return x


def as_output(x, name):
    """A caller's output array, which the core must write in place."""
    if x is None:
        return None
    if not _c_contiguous(x):
        raise _tpo.ShapeError(f"{name}: not C-contiguous; results are written in place, pass a contiguous array")
    if is_numpy_bfloat16(x):
        return (x.view(np.uint16), "bfloat16")
    return x


def as_image(x):
    """Images keep their memory order (the noise of an element is keyed by its offset)."""
    if is_torch(x) and x.requires_grad:
        return x.detach()
    if is_numpy_bfloat16(x):
        return (x.view(np.uint16), "bfloat16")
    return x


def empty_like(x):
    """An uninitialised C-contiguous array of x's shape, dtype, framework and device."""
    if is_torch(x):
        import torch

        return torch.empty_like(x, memory_format=torch.contiguous_format, requires_grad=False)
    if isinstance(x, np.ndarray):
        return np.empty(x.shape, dtype=x.dtype)
    raise _tpo.ShapeError(
        f"cannot allocate an output like a {type(x).__module__}.{type(x).__name__}; pass out= arrays")


def empty_image_like(x):
    """An uninitialised array of x's shape, dtype and memory order."""
    if is_torch(x):
        import torch

        return torch.empty_like(x, memory_format=torch.preserve_format, requires_grad=False)
    if isinstance(x, np.ndarray):
        return np.empty_like(x, order="K")
    raise _tpo.ShapeError(
        f"cannot allocate an image like a {type(x).__module__}.{type(x).__name__}; pass out=")


def cuda_stream(*arrays):
    """The current CUDA stream of the device of the first PyTorch CUDA tensor, as an integer (0 elsewhere)."""
    for x in arrays:
        if x is not None and is_torch(x) and x.is_cuda:
            import torch

            return torch.cuda.current_stream(x.device).cuda_stream
    return 0
