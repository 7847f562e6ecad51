"""Can this CPU's int8 kernels saturate? One answer, overridable for tests.

onnxruntime's x86 int8 kernels (MLAS) multiply uint8 activations by int8 weights. With
AVX-512 VNNI, AVX-VNNI or AMX the products accumulate in int32 (``vpdpbusd``, ``tdpbusd``)
and nothing saturates. Without them (plain AVX2 / AVX-512BW) they use ``vpmaddubsw``, which
adds two adjacent products into a **saturating int16**: ``255·127·2 = 64,770 > 32,767``.
int8 activations are shifted by +128 to uint8 first, so they saturate too. ARM's dot
product (``asimddp``, ``sdot``/``udot``) accumulates in int32 as well; ARM without it is
treated as "may saturate" (its fallback kernels are not documented to be exact). See
:mod:`bnexport.runtime.int8_kernels` for the rule applied to a graph's weights.

Detection reads the Linux ``/proc/cpuinfo`` flags (``avx512_vnni``, ``avx_vnni``,
``amx_int8``, ``asimddp``); elsewhere the answer is "may saturate". The environment
variable :data:`ENV_VAR` (``BNEXPORT_CPU_INT8``) overrides it:

- ``vnni``: behave as on a CPU whose int8 dot products accumulate in int32;
- ``novnni``: behave as on a CPU whose int8 kernels saturate (x86 AVX2 without VNNI);
- ``auto`` or unset: detect.

The override changes what bnexport *decides and predicts* (targets, warnings, the emulated
kernel error); it cannot change which kernels onnxruntime runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform

from bnexport.errors import UsageError

#: environment variable that overrides detection: ``vnni``, ``novnni`` or ``auto``
ENV_VAR = "BNEXPORT_CPU_INT8"
#: /proc/cpuinfo flags whose int8 dot products accumulate in int32 (no int16 saturation)
INT32_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
_CHOICES = ("auto", "vnni", "novnni")


@dataclasses.dataclass(frozen=True)
class Int8Features:
    """What this CPU offers int8 kernels.

    Attributes:
        machine: ``platform.machine()`` (``x86_64``, ``aarch64``, ...).
        flags: the :data:`INT32_DOT_FLAGS` found in ``/proc/cpuinfo`` (empty elsewhere).
        int32_dot: int8 dot products accumulate in int32 (VNNI / AVX-VNNI / AMX / ARM
            dot product), so onnxruntime's int8 kernels cannot saturate.
        source: ``"cpuinfo"`` (detected), ``"unknown"`` (no ``/proc/cpuinfo``: assumed
            to saturate) or ``"BNEXPORT_CPU_INT8=<value>"`` (overridden).
    """

    machine: str
    flags: tuple[str, ...]
    int32_dot: bool
    source: str

    @property
    def may_saturate(self) -> bool:
        """Whether onnxruntime's u8×s8 kernels may saturate on this CPU (no int32 dot)."""
        return not self.int32_dot

    @property
    def overridden(self) -> bool:
        """Whether :data:`ENV_VAR` decided (not the hardware)."""
        return self.source.startswith(ENV_VAR)

    def describe(self) -> str:
        """One phrase, e.g. ``x86_64 with avx512_vnni: int8 dot products in int32``."""
        found = ", ".join(self.flags) if self.flags else "no VNNI/AMX/dot-product flag"
        verdict = (
            "int8 dot products in int32 (no saturation)"
            if self.int32_dot
            else "int8 kernels may saturate (int16 pair sums)"
        )
        where = "" if self.source == "cpuinfo" else f" [{self.source}]"
        return f"{self.machine} with {found}: {verdict}{where}"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {**dataclasses.asdict(self), "may_saturate": self.may_saturate}


@functools.lru_cache(maxsize=1)
def detected_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...] | None:
    """The :data:`INT32_DOT_FLAGS` listed in ``cpuinfo`` (``None``: file unreadable)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    words: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
    return tuple(flag for flag in INT32_DOT_FLAGS if flag in words)


def override() -> str:
    """The value of :data:`ENV_VAR` (``"auto"`` when unset or empty).

    Raises:
        UsageError: any value other than ``vnni``, ``novnni`` or ``auto``.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise UsageError(
            f"{ENV_VAR} must be one of {', '.join(_CHOICES)}. "
            f"Received: {ENV_VAR}={os.environ.get(ENV_VAR)!r}"
        )
    return value


def hardware_int8_features() -> Int8Features:
    """What the hardware says, ignoring :data:`ENV_VAR`."""
    machine = platform.machine() or "unknown"
    flags = detected_flags()
    if flags is None:
        return Int8Features(machine, (), False, "unknown")
    return Int8Features(machine, flags, bool(flags), "cpuinfo")


def cpu_int8_features() -> Int8Features:
    """This CPU's int8 features, with :data:`ENV_VAR` applied (read on every call)."""
    hardware = hardware_int8_features()
    choice = override()
    if choice == "auto":
        return hardware
    return dataclasses.replace(hardware, int32_dot=choice == "vnni", source=f"{ENV_VAR}={choice}")
