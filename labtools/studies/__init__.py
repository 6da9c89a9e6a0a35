"""One study per notebook: the code a notebook calls, testable without papermill.

NOTEBOOKS is the one registry of notebook names: `labtools reproduce`, the CLI and the tests use it.
"""
from __future__ import annotations

from .batch_sweep import BatchSweepStudy
from .quickstart import QuickstartStudy
from .selection import SelectionStudy
from .strong_scaling import StrongScalingStudy
from .sync_strategies import SyncStrategiesStudy

STUDIES = {s.notebook: s for s in (QuickstartStudy, BatchSweepStudy, StrongScalingStudy, SyncStrategiesStudy,
                                   SelectionStudy)}
NOTEBOOKS = list(STUDIES)
PROFILES = ("smoke", "quick", "paper")


def study(notebook: str, profile: str = "quick", **kw):
    if notebook not in STUDIES:
        raise ValueError(f"unknown notebook {notebook!r}; choose one of {', '.join(NOTEBOOKS)}")
    return STUDIES[notebook](profile, **kw)
