"""How many replicas, where, and on what: the options ``serve --replicas`` adds.

Plain data and argument checks; nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnexport.errors import UsageError

#: the Ray Serve application (and deployment) name
APP_NAME = "bnexport"
#: Ray namespace of the driver, the replicas and the metrics board (Serve's own)
NAMESPACE = "serve"


@dataclass(frozen=True)
class ReplicaOptions:
    """Ray Serve replicas of the server.

    Args:
        replicas: replicas to start (with ``autoscale``: the initial count).
        ray_address: an existing Ray cluster (``auto``, ``HOST:PORT`` or ``ray://...``);
            ``None`` starts a private local Ray on loopback, stopped with the server.
        gpus_per_replica: GPUs Ray reserves for each replica (fractions share a GPU).
        autoscale: ``(min, max)`` replicas; Ray adds or removes replicas to keep
            ``target_ongoing_requests`` requests in flight per replica.
        target_ongoing_requests: with ``autoscale``, requests in flight per replica Ray
            aims for (default: ``--max-batch``, one full batch).
    """

    replicas: int = 1
    ray_address: str | None = None
    gpus_per_replica: float = 0.0
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float | None = None

    def problems(self) -> list[str]:
        """What is wrong with these options, one ``--flag=value (rule)`` each."""
        bad = []
        if self.replicas < 1:
            bad.append(f"--replicas={self.replicas} (>= 1)")
        if self.gpus_per_replica < 0:
            bad.append(f"--gpus-per-replica={self.gpus_per_replica} (>= 0)")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                bad.append(f"--autoscale={low}:{high} (0 <= MIN <= MAX, MAX >= 1)")
            elif not low <= self.replicas <= high:
                bad.append(f"--replicas={self.replicas} (within --autoscale {low}:{high})")
        return bad

    @property
    def most_replicas(self) -> int:
        """The largest number of replicas these options can ask for."""
        return max(self.replicas, self.autoscale[1] if self.autoscale else 0)


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` as two ints.

    Raises:
        UsageError: not two integers separated by ``:``.
    """
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise UsageError(f"--autoscale={text!r}: expected MIN:MAX, e.g. 1:4") from None
