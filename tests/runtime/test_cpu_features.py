"""``cpu_int8_features``: /proc/cpuinfo flags, the BNEXPORT_CPU_INT8 override, bad values."""

from __future__ import annotations

import pytest

from bnexport.errors import UsageError
from bnexport.runtime import cpu_features
from bnexport.runtime.cpu_features import ENV_VAR, cpu_int8_features, detected_flags

X86_NO_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n"
X86_VNNI = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_int8\n"
ARM_DOTPROD = "processor\t: 0\nFeatures\t: fp asimd asimddp sve\n"


@pytest.mark.parametrize(
    "text, flags",
    [(X86_NO_VNNI, ()), (X86_VNNI, ("avx512_vnni", "amx_int8")), (ARM_DOTPROD, ("asimddp",))],
)
def test_flags_read_from_cpuinfo(tmp_path, text, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    detected_flags.cache_clear()
    try:
        assert detected_flags(str(path)) == flags
    finally:
        detected_flags.cache_clear()


def test_unreadable_cpuinfo_means_may_saturate(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_features, "detected_flags", lambda: None)
    features = cpu_int8_features()
    assert features.source == "unknown" and features.may_saturate and not features.flags


@pytest.mark.needs("proc_cpuinfo", unverified="the detection path on a real /proc/cpuinfo")
def test_detection_matches_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        words = set(handle.read().split())
    features = cpu_int8_features()
    expected = any(f in words for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))
    assert features.int32_dot is expected and features.source == "cpuinfo"


@pytest.mark.parametrize(
    "value, int32_dot", [("vnni", True), ("novnni", False), ("NoVnni ", False)]
)
def test_override_wins_over_hardware(monkeypatch, value, int32_dot):
    monkeypatch.setenv(ENV_VAR, value)
    features = cpu_int8_features()
    assert features.int32_dot is int32_dot and features.may_saturate is not int32_dot
    assert features.overridden and ENV_VAR in features.describe()
    assert features.flags == cpu_features.hardware_int8_features().flags  # hardware kept


@pytest.mark.parametrize("value", ["auto", ""])
def test_auto_is_detection(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    assert cpu_int8_features() == cpu_features.hardware_int8_features()


def test_bad_override_is_one_usage_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "avx2")
    with pytest.raises(UsageError, match="BNEXPORT_CPU_INT8 must be one of auto, vnni, novnni"):
        cpu_int8_features()
