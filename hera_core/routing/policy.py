"""Routing policy: local when P(SLM good enough) >= the step's threshold (kappa(step), weighed by its
expected cloud cost when the predictor is), unless the step is forced. The first rule of the step
plan (`hera_core.routing.plan`), which adds drafting, voting and the familiarity check around it.

Local-only steps (confidential data) never leave the device, whatever the predictor says.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Route(str, Enum):
    LOCAL = "local"
    CLOUD = "cloud"


class Override(str, Enum):
    """Per-request override (header X-Hera-Policy, or Runtime.complete(policy=...))."""

    AUTO = "auto"
    LOCAL_ONLY = "local-only"  # confidential: never leaves the device
    CLOUD_ONLY = "cloud-only"


@dataclass(frozen=True)
class Decision:
    route: Route
    reason: str  # predictor | local-only | cloud-only | cannot-serve-locally | budget-* | draft-kept | escalated
    #              | unfamiliar | fallback-local | invalid-tool-call | tool-call-dropped | drafting (cancelled)
    p_local: float | None
    threshold: float | None


def decide(p_local: float | None, threshold: float | None, override: Override = Override.AUTO,
           local_can_serve: bool = True) -> Decision:
    if override is Override.LOCAL_ONLY:
        return Decision(Route.LOCAL, "local-only", p_local, threshold)
    if override is Override.CLOUD_ONLY:
        return Decision(Route.CLOUD, "cloud-only", p_local, threshold)
    if not local_can_serve:
        return Decision(Route.CLOUD, "cannot-serve-locally", p_local, threshold)
    assert p_local is not None and threshold is not None, "AUTO routing needs a score and a threshold"
    route = Route.LOCAL if p_local >= threshold else Route.CLOUD
    return Decision(route, "predictor", p_local, threshold)
