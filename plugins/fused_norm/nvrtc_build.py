"""Compile ``fused_norm.cu`` with NVRTC to a cubin (or PTX), cached on disk.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel through ``cuda-python``
(``cuda.bindings.nvrtc``); no CUDA toolkit and no GPU are needed to compile.
The kernel source includes no headers (16-bit conversions are inline PTX), so
it builds with a bare NVRTC.

* :func:`compile_kernels` builds for one architecture: a cubin (``sm_XX``, what
  the driver loads directly, the default) or PTX (``compute_XX``; what the
  TensorRT ahead-of-time plugin path takes). If NVRTC does not know the
  requested architecture (a GPU newer than the wheel), it falls back to PTX for
  the newest architecture it knows, which the driver JIT-compiles.
* PTX carries a ``.version`` (PTX ISA) directive, and a driver older than NVRTC
  refuses a newer one (``CUDA_ERROR_UNSUPPORTED_PTX_VERSION``) even though these
  kernels use nothing new: ``ptx_isa`` rewrites the directive, down to what the
  driver accepts (:func:`ptx_isa_for_driver` of ``cuDriverGetVersion``; e.g. NVRTC
  13.5 writes 9.5, a CUDA 13.0 driver takes at most 9.0).
* A cubin loads on a driver of the same CUDA major as NVRTC or newer (minor-version
  compatibility); under an older major the kernels go as PTX instead
  (:func:`image_kind_for_driver`).
* Results are cached in ``$BNEXPORT_CACHE_DIR`` (default ``~/.cache/bnexport/kernels``)
  under a key made of the source hash, the target, the options and the NVRTC
  version; files are written atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from bnexport.atomic_write import write_bytes_atomic
from bnexport.errors import BnexportError

DEFAULT_ARCHS = ("sm_80", "sm_90")
SOURCE_NAME = "fused_norm.cu"
DTYPE_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
KERNEL_KINDS = ("affine", "apply", "stats_planar", "stats_rows", "batch_stats", "batch_stats_out")
FINALIZE_KERNEL = "fused_norm_stats_finalize"
DEFAULT_OPTIONS = ("--std=c++17", "-default-device")


@dataclass(frozen=True)
class CompiledKernels:
    """One compiled module.

    Attributes:
        arch: Target it was built for (``sm_90`` for a cubin, ``compute_90`` for PTX).
        kind: ``"cubin"`` or ``"ptx"``.
        image: The cubin bytes, or the PTX text as bytes (no trailing NUL).
        nvrtc_version: ``(major, minor)`` of the NVRTC that built it.
        log: The NVRTC log (warnings), possibly empty.
        cached: True if it was read from the disk cache.
    """

    arch: str
    kind: str
    image: bytes
    nvrtc_version: tuple[int, int]
    log: str = ""
    cached: bool = field(default=False, compare=False)


def entry_name(kind: str, dtype: str) -> str:
    """Name of the ``extern "C"`` kernel of ``kind`` (see ``KERNEL_KINDS``) for ``dtype``."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KERNEL_KINDS}")
    return f"fused_norm_{kind}_{DTYPE_SUFFIX[dtype]}"


def all_entry_names() -> list[str]:
    """Every kernel entry point ``fused_norm.cu`` defines."""
    return [entry_name(k, d) for k in KERNEL_KINDS for d in DTYPE_SUFFIX] + [FINALIZE_KERNEL]


def kernel_source() -> bytes:
    """The CUDA C source of the kernels."""
    return (Path(__file__).with_name(SOURCE_NAME)).read_bytes()


def _nvrtc():
    """``cuda.bindings.nvrtc`` with its library loaded (BackendUnavailableError otherwise)."""
    from bnexport.cuda_api import nvrtc

    return nvrtc()


def _check(result, what: str, log: str = "") -> None:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        from bnexport.errors import PluginError

        raise PluginError(f"NVRTC {what} failed ({err!r}){': ' + log if log else ''}")


@lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    """``(major, minor)`` of the NVRTC library in use."""
    res = _nvrtc().nvrtcVersion()
    _check(res, "nvrtcVersion")
    return int(res[1]), int(res[2])


@lru_cache(maxsize=1)
def supported_archs() -> tuple[int, ...]:
    """Compute capabilities (e.g. 80, 90) NVRTC can build cubins for."""
    res = _nvrtc().nvrtcGetSupportedArchs()
    _check(res, "nvrtcGetSupportedArchs")
    return tuple(int(a) for a in res[1])


def _cc(arch: str | int) -> int:
    """``"sm_90"`` / ``"compute_90"`` / ``90`` -> 90."""
    if isinstance(arch, int):
        return arch
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)[af]?", str(arch))
    if not m:
        from bnexport.errors import PluginError

        raise PluginError(f"FusedNorm: bad GPU architecture {arch!r}; expected e.g. 'sm_90'")
    return int(m.group(1))


def cache_dir() -> Path:
    """Kernel cache folder (``$BNEXPORT_CACHE_DIR`` or ``~/.cache/bnexport/kernels``)."""
    env = os.environ.get("BNEXPORT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "bnexport" / "kernels"


#: Oldest PTX ISA that can name each target (PTX ISA release notes).
MIN_PTX_ISA = {
    80: (7, 0),
    86: (7, 1),
    87: (7, 4),
    89: (7, 8),
    90: (7, 8),
    100: (8, 6),
    101: (8, 6),
    103: (8, 8),
    110: (9, 0),
    120: (8, 7),
    121: (8, 8),
}


def cap_ptx_isa(ptx: bytes, version: str) -> bytes:
    """Lower the PTX ``.version`` directive to ``version`` (never raises it).

    Never goes below the oldest ISA that knows the module's ``.target``. Safe for
    ``fused_norm.cu``: it uses only instructions from PTX ISA 7.0 and older.
    """
    m = re.search(rb"^\.version\s+(\d+)\.(\d+)", ptx, flags=re.M)
    if not m:
        return ptx
    have = (int(m.group(1)), int(m.group(2)))
    want = tuple(int(v) for v in version.split("."))
    t = re.search(rb"^\.target\s+sm_(\d+)", ptx, flags=re.M)
    if t:
        want = max(want, MIN_PTX_ISA.get(int(t.group(1)), have))
    if want >= have:
        return ptx
    return ptx[: m.start()] + f".version {want[0]}.{want[1]}".encode() + ptx[m.end() :]


#: PTX ISA versions that may be asked of the cuda-bindings table, newest first.
_ISA_CANDIDATES = tuple(
    f"{major}.{minor}" for major in range(12, 6, -1) for minor in range(9, -1, -1)
)
#: Used when cuda-bindings has no PTX table: every driver of CUDA >= 12.0 takes ISA 8.0.
_FALLBACK_ISA = ((12000, "8.0"), (11000, "7.0"))


def ptx_isa_for_driver(driver_version: int) -> str | None:
    """The newest PTX ISA a driver loads, as ``"M.m"``; ``None`` below CUDA 11.0.

    Args:
        driver_version: ``cuDriverGetVersion()``: ``1000 * major + 10 * minor``
            (``13000`` is CUDA 13.0).

    The ISA -> CUDA table is cuda-bindings' own
    (``cuda.bindings.utils.get_minimal_required_cuda_ver_from_ptx_ver``, from the PTX
    ISA release history): CUDA 12.6 -> 8.5, 12.8 -> 8.7, 13.0 -> 9.0. A driver newer
    than the table gets the table's newest ISA; these kernels need only ISA 7.0 (plus
    the target's minimum, :data:`MIN_PTX_ISA`), so capping lower than needed is harmless.
    """
    try:
        from cuda.bindings.utils import get_minimal_required_cuda_ver_from_ptx_ver as needs
    except ImportError:  # cuda-bindings < 12.9 has no table: a conservative floor
        return next((isa for first, isa in _FALLBACK_ISA if driver_version >= first), None)
    for isa in _ISA_CANDIDATES:
        try:
            if needs(isa) <= driver_version:
                return isa
        except ValueError:  # an ISA this cuda-bindings does not know
            continue
    return None


def image_kind_for_driver(driver_version: int, nvrtc: tuple[int, int]) -> str:
    """``"cubin"`` when a driver can load NVRTC's cubins (same CUDA major or newer), else ``"ptx"``.

    A cubin built by NVRTC ``X.y`` loads on any driver of CUDA ``X.0`` or newer (CUDA
    minor-version compatibility); under an older major only PTX (JIT-compiled by the
    driver, ISA lowered with :func:`ptx_isa_for_driver`) can run.
    """
    return "cubin" if driver_version // 1000 >= nvrtc[0] else "ptx"


def compile_kernels(
    arch: str | int = DEFAULT_ARCHS[-1],
    *,
    kind: str = "cubin",
    ptx_isa: str | None = None,
    options: tuple[str, ...] = (),
    use_cache: bool = True,
) -> CompiledKernels:
    """Compile the FusedNorm kernels for one GPU architecture.

    Args:
        arch: ``"sm_90"``, ``"compute_90"`` or ``90``.
        kind: ``"cubin"`` or ``"ptx"``. A cubin request for an architecture NVRTC
            does not know falls back to PTX for the newest one it knows.
        ptx_isa: For PTX: cap the ``.version`` directive (see :func:`cap_ptx_isa`).
        options: Extra NVRTC options.
        use_cache: Read/write the disk cache.

    Returns:
        The compiled module.

    Raises:
        PluginError: the compilation failed (the NVRTC log is in the message).
        BackendUnavailableError: cuda-python / NVRTC are not installed.
    """
    if kind not in ("cubin", "ptx"):
        raise ValueError(f"kind must be 'cubin' or 'ptx'. Received: {kind!r}")
    cc = _cc(arch)
    known = supported_archs()
    if cc not in known:
        older = [a for a in known if a <= cc]
        if not older:
            from bnexport.errors import PluginError

            raise PluginError(
                f"FusedNorm: NVRTC {nvrtc_version()} cannot target sm_{cc} (knows {known})"
            )
        cc, kind = max(older), "ptx"
    target = f"sm_{cc}" if kind == "cubin" else f"compute_{cc}"
    src = kernel_source()
    opts = (*DEFAULT_OPTIONS, f"--gpu-architecture={target}", *options)
    ver = nvrtc_version()
    key = hashlib.sha256(
        b"\0".join([src, target.encode(), kind.encode(), repr(opts).encode(), repr(ver).encode()])
    ).hexdigest()[:32]
    path = cache_dir() / f"fused_norm-{target}-nvrtc{ver[0]}.{ver[1]}-{key}.{kind}"
    if use_cache and path.is_file():
        image = path.read_bytes()
        if kind == "ptx" and ptx_isa:
            image = cap_ptx_isa(image, ptx_isa)
        return CompiledKernels(target, kind, image, ver, "", cached=True)

    nvrtc = _nvrtc()
    res = nvrtc.nvrtcCreateProgram(src, SOURCE_NAME.encode(), 0, [], [])
    _check(res, "nvrtcCreateProgram")
    prog = res[1]
    try:
        enc = [o.encode() for o in opts]
        compiled = nvrtc.nvrtcCompileProgram(prog, len(enc), enc)
        size = nvrtc.nvrtcGetProgramLogSize(prog)[1]
        # NVRTC writes into the buffer: a fresh bytearray, never ``b" " * n``, which for
        # n == 1 is CPython's shared one-byte ``b" "`` object (NVRTC's NUL would corrupt it
        # for the whole process).
        buf = bytearray(size)
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = bytes(buf).rstrip(b"\0 ").decode(errors="replace")
        _check(compiled, f"compilation of {SOURCE_NAME} for {target}", log)
        if kind == "cubin":
            res = nvrtc.nvrtcGetCUBINSize(prog)
            _check(res, "nvrtcGetCUBINSize")
            cubin = bytearray(res[1])
            _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            image = bytes(cubin)
        else:
            res = nvrtc.nvrtcGetPTXSize(prog)
            _check(res, "nvrtcGetPTXSize")
            ptx = bytearray(res[1])
            _check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            image = bytes(ptx).rstrip(b"\0")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if not image:
        from bnexport.errors import PluginError

        raise PluginError(f"NVRTC produced an empty {kind} for {target}")
    if use_cache:
        try:
            write_bytes_atomic(path, image, make_parents=True)
        except (OSError, BnexportError):
            pass  # a read-only or missing cache folder is not an error: the image is in hand
    if kind == "ptx" and ptx_isa:
        image = cap_ptx_isa(image, ptx_isa)
    return CompiledKernels(target, kind, image, ver, log)


def cubin_symbols(image: bytes) -> list[str]:
    """Names in the symbol table of an ELF64 cubin (functions, variables, sections).

    Raises:
        ValueError: ``image`` is not a little-endian ELF64 file.
    """
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not a little-endian ELF64 image")
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize) for i in range(shnum)
    ]
    names: list[str] = []
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        offset, size, link, entsize = sh[4], sh[5], sh[6], sh[9]
        str_off = sections[link][4]
        for k in range(size // entsize):
            st_name = struct.unpack_from("<I", image, offset + k * entsize)[0]
            end = image.index(b"\0", str_off + st_name)
            if st_name:
                names.append(image[str_off + st_name : end].decode())
    return names


def ptx_entries(image: bytes) -> list[str]:
    """Names of the ``.entry`` kernels of a PTX module."""
    return [m.decode() for m in re.findall(rb"\.entry\s+([A-Za-z_]\w*)", image)]
