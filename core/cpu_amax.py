"""A one-read abs-max for CPU float tensors, float8 included: a small C loop over the magnitudes' bits. Pure.

torch has no vectorized CPU kernel that fuses the ``abs`` into a max: its inf-norm
kernel is scalar (13x slower than ``amax`` over 256 MiB of fp32), ``aminmax`` over a
dimension is scalar too, and a max pass plus a min pass reads the input twice (about
0.5x of one ``amax``). This loop reads once.

It never compares floats. Clearing the sign bit leaves a float's magnitude, and the
magnitudes of one format order like their bits read as unsigned integers, every NaN
above inf: so an unsigned max over ``bits & 0x7fff...`` is the abs-max, NaN
propagating and ``|-0.0|`` coming out ``+0.0``, for fp32 (32-bit lanes), bf16 and fp16
alike (16-bit lanes) and the float8 formats (8-bit lanes; the fnuz ones keep their one
NaN, ``0x80``, as it is). Sixty-four independent maxima per loop keep several vector
registers in flight instead of one chain of dependent steps. Nothing wider than the
input is ever made: a float8 tensor is read as the bytes it is.

Work is spread over torch's threads (OpenMP: the library links the ``libgomp`` torch
has loaded, so ``torch.set_num_threads`` sets its threads too): rows over the threads,
a row too long for its share split into chunks; over leading dimensions, each thread
folds its rows into a scratch row, or, when there are columns enough, owns blocks of
columns across every row.

The C source is compiled once per process on first use, for the CPU it runs on
(``-march=native``; about 0.15 s with gcc, into a private temporary directory), with
the compiler ``$CC`` names (``cc`` by default). Where that fails, the first call warns
once and ``available`` answers False from then on: ``reduce`` keeps its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["MIN_ELEMENTS", "abs_max", "available", "threads"]

# Below this many elements the torch passes take a few microseconds, about what the
# call into the library and the start of its threads cost.
MIN_ELEMENTS = 1 << 12
# Elements per chunk when a row is split over the threads: 256 KiB of fp32.
_CHUNK = 1 << 16
# Columns per block when a reduction over the leading dimension is split by columns:
# each row's share is a 16 KiB run of fp32, read in order.
_BLOCK = 1 << 12

_LANE = """
static {lane} {name}_span(const {lane} *x, int64_t n) {{
    {lane} acc[LANES] = {{0}};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {{
            {lane} v = MAGNITUDE_{name}(x[i + j]);
            acc[j] = v > acc[j] ? v : acc[j];
        }}
    {lane} m = 0;
    for (int j = 0; j < LANES; j++) m = acc[j] > m ? acc[j] : m;
    for (; i < n; i++) {{
        {lane} v = MAGNITUDE_{name}(x[i]);
        m = v > m ? v : m;
    }}
    return m;
}}

void {name}(const {lane} *x, int64_t rows, int64_t cols, {lane} *out) {{
    if (rows >= omp_get_max_threads()) {{
        #pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; r++) out[r] = {name}_span(x + r * cols, cols);
        return;
    }}
    int64_t chunks = (cols + CHUNK - 1) / CHUNK;
    for (int64_t r = 0; r < rows; r++) {{
        const {lane} *row = x + r * cols;
        {lane} m = 0;
        #pragma omp parallel for schedule(static) reduction(max : m)
        for (int64_t c = 0; c < chunks; c++) {{
            int64_t start = c * CHUNK;
            {lane} v = {name}_span(row + start, cols - start < CHUNK ? cols - start : CHUNK);
            m = v > m ? v : m;
        }}
        out[r] = m;
    }}
}}

static void {name}_fold(const {lane} *x, int64_t rows, int64_t cols, int64_t stride, {lane} *acc) {{
    for (int64_t r = 0; r < rows; r++) {{
        const {lane} *row = x + r * stride;
        for (int64_t j = 0; j < cols; j++) {{
            {lane} v = MAGNITUDE_{name}(row[j]);
            acc[j] = v > acc[j] ? v : acc[j];
        }}
    }}
}}

/* Over the leading dimension: out[j] = max over r of |x[r][j]|. A narrow tensor
   (under BLOCK columns a thread) needs a scratch row per thread: threads() * cols lanes. */
void {name}_leading(const {lane} *x, int64_t rows, int64_t cols, {lane} *out, {lane} *scratch) {{
    for (int64_t j = 0; j < cols; j++) out[j] = 0;
    if (cols >= (int64_t)BLOCK * omp_get_max_threads()) {{  /* wide: each thread owns blocks of columns */
        int64_t blocks = (cols + BLOCK - 1) / BLOCK;
        #pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {{
            int64_t start = b * BLOCK;
            {name}_fold(x + start, rows, cols - start < BLOCK ? cols - start : BLOCK, cols, out + start);
        }}
        return;
    }}
    #pragma omp parallel
    {{  /* narrow: each thread folds its share of the rows into its scratch row, then into out */
        {lane} *acc = scratch + (int64_t)omp_get_thread_num() * cols;
        for (int64_t j = 0; j < cols; j++) acc[j] = 0;
        #pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < rows; r++) {name}_fold(x + r * cols, 1, cols, cols, acc);
        #pragma omp critical
        for (int64_t j = 0; j < cols; j++) out[j] = acc[j] > out[j] ? acc[j] : out[j];
    }}
}}
"""

# Each lane's magnitude: the bits with the sign cleared. The fnuz float8 formats have
# no negative zero; their one NaN, 0x80, is kept as it is, above every magnitude.
_MAGNITUDES = {
    "abs_max_32": ("uint32_t", "(b) & 0x7fffffffu"),
    "abs_max_16": ("uint16_t", "(uint16_t)((b) & 0x7fffu)"),
    "abs_max_8": ("uint8_t", "(uint8_t)((b) & 0x7fu)"),
    "abs_max_8nuz": ("uint8_t", "(uint8_t)((b) == 0x80u ? 0x80u : (b) & 0x7fu)"),
}
_SOURCE = (
    "#include <stdint.h>\n#include <omp.h>\n"
    '#ifdef __cplusplus\nextern "C" {\n#endif\n'  # a C++ compiler in $CC must not mangle the names
    f"enum {{ LANES = 64, CHUNK = {_CHUNK}, BLOCK = {_BLOCK} }};\n"
    "int threads(void) { return omp_get_max_threads(); }\n"
    + "".join(
        f"#define MAGNITUDE_{name}(b) ({magnitude})\n" + _LANE.format(lane=lane, name=name)
        for name, (lane, magnitude) in _MAGNITUDES.items()
    )
    + "#ifdef __cplusplus\n}\n#endif\n"
)

# Each float dtype read as the unsigned lanes of its width (torch's signed integer
# dtypes of that width hold the result's bits; the sign bit is always clear there).
_LANES = {torch.float32: (torch.int32, "abs_max_32"), torch.bfloat16: (torch.int16, "abs_max_16"), torch.float16: (torch.int16, "abs_max_16")}
_LANES.update((getattr(torch, f), (torch.uint8, "abs_max_8")) for f in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, f))
_LANES.update((getattr(torch, f), (torch.uint8, "abs_max_8nuz")) for f in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, f))
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64

_broken: list[str] = []  # why the library could not be built, once it failed


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled loop, or ``None`` (with one warning) where it cannot be built."""
    command = shlex.split(os.environ.get("CC", "cc")) + ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    try:
        with tempfile.TemporaryDirectory(prefix="sharedquant-", ignore_cleanup_errors=True) as folder:
            source, built = Path(folder, "abs_max.c"), Path(folder, "abs_max.so")
            source.write_text(_SOURCE)
            subprocess.run([*command, str(source), "-o", str(built)], check=True, capture_output=True, timeout=120)
            library = ctypes.CDLL(str(built))  # loaded: the file itself can go
        for name in _MAGNITUDES:
            getattr(library, name).argtypes = [_POINTER, _SIZE, _SIZE, _POINTER]
            getattr(library, f"{name}_leading").argtypes = [_POINTER, _SIZE, _SIZE, _POINTER, _POINTER]
            getattr(library, name).restype = getattr(library, f"{name}_leading").restype = None
        library.threads.restype = ctypes.c_int
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        stderr = getattr(error, "stderr", b"") or b""
        reason = (stderr.decode(errors="replace").strip().splitlines() or [str(error)])[0]
        _broken.append(reason)
        warnings.warn(f"sharedquant: the one-read CPU abs-max loop could not be built ({reason}); using two passes", RuntimeWarning, stacklevel=6)
        return None
    return library


def available(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> bool:
    """Whether ``abs_max`` takes this reduction.

    It takes plain (not subclassed), contiguous CPU tensors of fp32, bf16, fp16 or float8 with at
    least ``MIN_ELEMENTS`` elements, reduced whole, over trailing dimensions or over
    leading ones, whose extent is 2 or more. The caller keeps traced tensors
    (torch.compile, torch.func) away: they need no kernel.
    """
    if _broken or type(tensor) is not torch.Tensor or tensor.device.type != "cpu" or tensor.dtype not in _LANES:
        return False
    if tensor.numel() < MIN_ELEMENTS or not tensor.is_contiguous():
        return False
    if axis is None:
        return True
    rank, reduced = tensor.dim(), sorted(axis)
    trailing, leading = reduced == list(range(rank - len(axis), rank)), reduced == list(range(len(axis)))
    return len(axis) > 0 and (trailing or leading) and math.prod(tensor.shape[d] for d in axis) >= 2


def abs_max(tensor: torch.Tensor, axis: tuple[int, ...] | None) -> torch.Tensor | None:
    """abs-max over ``axis`` with the reduced dimensions kept (length 1), in the input's dtype.

    ``None`` when the loop could not be built (the caller falls back). The caller
    checks ``available`` first.
    """
    library = _library()
    if library is None:
        return None
    rank = tensor.dim()
    reduced = range(rank) if axis is None else sorted(axis)
    lanes, name = _LANES[tensor.dtype]
    shape = [1 if d in reduced else size for d, size in enumerate(tensor.shape)]
    if len(reduced) == rank or reduced[0] > 0:  # all dimensions, or trailing ones: one result a row
        rows = math.prod(shape)
        bits = torch.empty(rows, dtype=lanes)
        getattr(library, name)(tensor.data_ptr(), rows, tensor.numel() // rows, bits.data_ptr())
    else:  # leading dimensions: one result a column
        columns = math.prod(shape)
        bits = torch.empty(columns, dtype=lanes)
        scratch = torch.empty(library.threads() * columns, dtype=lanes)
        getattr(library, f"{name}_leading")(tensor.data_ptr(), tensor.numel() // columns, columns, bits.data_ptr(), scratch.data_ptr())
    return bits.view(tensor.dtype).reshape(shape)


def threads() -> int | None:
    """How many threads the loop runs on (``None`` where it could not be built)."""
    library = _library()
    return None if library is None else library.threads()
