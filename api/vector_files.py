"""Vectors uploaded as files, read without pickle and without torch: `.npy` (numpy.load with allow_pickle=False)
and `.safetensors` (the safetensors package's numpy backend). A `.pt`/`.pth`/`.bin`/`.pkl` file is a pickle, which
runs code of the sender's choosing when loaded: it is refused, with that reason, before a byte of it is read.
"""

from __future__ import annotations

import io

import numpy as np

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
SUFFIXES = (".npy", ".safetensors")


class VectorFileError(ValueError):
    """A file that holds no usable vectors; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.message = message
        self.status = status


def check_name(filename: str | None) -> str:
    """The file's format from its name; refuses pickles and unknown formats (before reading the body)."""
    name = (filename or "").lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise VectorFileError(
            f"{filename!r} looks like a PyTorch/pickle file: loading a pickle runs code chosen by whoever made it, so "
            "the service never loads one. Save the vectors with numpy.save (.npy) or safetensors (.safetensors), "
            "e.g. numpy.save('v.npy', tensor.float().cpu().numpy())", status=415)
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise VectorFileError(f"{filename!r}: upload a .npy or .safetensors file", status=415)


def read_vectors(data: bytes, suffix: str, tensor: str | None = None) -> np.ndarray:
    """The uploaded vectors as a finite float64 array of shape (n, hidden); 1-D means one vector."""
    if not data:
        raise VectorFileError("the file is empty")
    if suffix == ".npy":
        _check_npy_size(data)
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:  # an object array (needs pickle), a broken header, a truncated body
            raise VectorFileError(f"not a readable .npy array without pickle: {exc}") from None
        except (OSError, EOFError) as exc:
            raise VectorFileError(f"not a .npy file: {exc}") from None
        if not isinstance(array, np.ndarray):
            raise VectorFileError("the .npy file holds no array")
    else:
        array = _safetensors_array(data, tensor)
    if array.dtype.kind not in "fiu":
        raise VectorFileError(f"the vectors have dtype {array.dtype}; expected floats (or integers)")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise VectorFileError(f"the array has shape {array.shape}; expected (hidden_size,) or (n, hidden_size)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise VectorFileError(f"the array has shape {array.shape}: no vectors")
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise VectorFileError(f"vector {row} contains NaN or infinite values")
    return values


def _check_npy_size(data: bytes) -> None:
    """Refuse a .npy whose header's shape does not match the bytes after it. numpy.load allocates the array the
    header describes before reading it: a few hundred bytes claiming (100000000, 576) made it allocate 215 GiB
    (a MemoryError, answered 500), and a dimension past int64 raised OverflowError (500)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:  # 3.0 only differs for structured dtypes with non-Latin-1 field names, which are no vectors
            raise VectorFileError(f"a .npy file of format version {version[0]}.{version[1]}; save it with numpy.save")
    except ValueError as exc:
        raise VectorFileError(f"not a .npy file: {exc}") from None
    if dtype.hasobject:
        raise VectorFileError("not a readable .npy array without pickle: the array holds Python objects")
    expected = dtype.itemsize
    for dim in shape:
        expected *= dim
    held = len(data) - stream.tell()
    if expected != held:
        raise VectorFileError(f"not a readable .npy array: its header says shape {shape} of {dtype} "
                              f"({expected} bytes) but {held} bytes follow it")


def _safetensors_array(data: bytes, tensor: str | None) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as exc:  # also a dtype numpy has no type for (bfloat16)
        raise VectorFileError(f"not a readable .safetensors file (numpy dtypes only, e.g. float32): {exc}") from None
    if tensor is not None:
        if tensor not in tensors:
            raise VectorFileError(f"no tensor {tensor!r} in the file; it holds: {', '.join(sorted(tensors))}")
        return tensors[tensor]
    if len(tensors) != 1:
        raise VectorFileError(f"the file holds {len(tensors)} tensors ({', '.join(sorted(tensors)) or 'none'}); "
                              "name the one to interpret with the 'tensor' field")
    return next(iter(tensors.values()))
