"""Read one sample from Prometheus text exposition, failing when it is not there."""

from __future__ import annotations

_MISSING = object()


def metric(text: str, name: str, labels: dict[str, str] | None = None, /, **kw: object) -> float:
    """Value of the sample ``name`` whose labels include ``labels`` (and ``**kw`` labels).

    A sample that is not there fails the test (a counter read as 0.0 when missing would
    let ``>= 0`` and ``== before`` assertions pass on a server that never counted);
    pass ``default=0.0`` where absence is a legitimate reading (a counter before its
    first increment).

    Raises:
        AssertionError: no such sample and no ``default``; the message lists the
            samples of that name that exist.
    """
    from prometheus_client.parser import text_string_to_metric_families

    default = kw.pop("default", _MISSING)
    want = {**(labels or {}), **{k: str(v) for k, v in kw.items()}}
    seen = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if all(sample.labels.get(k) == v for k, v in want.items()):
                return sample.value
            seen.append(sample.labels)
    if default is not _MISSING:
        return float(default)  # type: ignore[arg-type]
    raise AssertionError(f"no sample {name}{want} in the metrics; samples of {name}: {seen}")
