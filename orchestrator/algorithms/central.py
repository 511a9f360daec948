"""The pooled-data ceiling: one learner holding everyone's data takes the whole fleet's batch
each round with PSL's server step. Nothing travels: it runs only in the in-process engine."""

from __future__ import annotations

from orchestrator.algorithms.psl import Psl


class Central(Psl):
    name = "central"
    pooled = True
    simulate_only = True
