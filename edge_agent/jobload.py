"""Taking a job on this device: the local dataset checked against the job spec, the trainer built
from it, and a local checkpoint of the run restored or written.

Synchronous (torch, disk): the connection runs these in a worker thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .checkpoint import CheckpointStore
from .config import AgentConfig
from .errors import CheckpointError, DataError, JobFailed
from .jobspec import JobSpec

if TYPE_CHECKING:
    from .trainer import ClientTrainer

log = logging.getLogger("edge_agent")


def build_trainer(spec: JobSpec, shard: Any, weights: Any, cfg: AgentConfig) -> ClientTrainer:
    """The trainer of ``spec`` on this device's copy of the dataset; JobFailed if it cannot be."""
    from .data import load_dataset
    from .trainer import ClientTrainer

    try:
        ds = load_dataset(spec.dataset, cfg.data_dir, download=cfg.download)
    except DataError as exc:
        raise JobFailed(str(exc)) from exc
    if ds.fingerprint != spec.dataset_fingerprint:
        raise JobFailed(
            f"the local copy of {spec.dataset} differs from the orchestrator's "
            "(fingerprints disagree): point --data-dir at the same dataset files, or make "
            "the loader return the same arrays on every machine"
        )
    if len(shard) and int(shard.max()) >= len(ds.y_train):
        raise JobFailed("shard indices out of range for the local dataset")
    return ClientTrainer(spec, shard, weights, ds.x_train, ds.y_train, ds.normalize, cfg.device)


def restore(
    trainer: ClientTrainer, store: CheckpointStore | None, run_id: str, resume_round: int
) -> int | None:
    """Carry on from a local checkpoint of this run, if there is a fitting one.

    ``resume_round`` > 0: the orchestrator resumes from that round, so only that round's
    checkpoint fits; without one the job's weights (the orchestrator's copy of this
    partition at that round) stand, with a fresh optimizer. 0: the newest checkpoint of the
    run, which is what a device that restarted mid-run wants. Returns the restored round.
    """
    state = None
    if store is not None:
        state = store.load(run_id, resume_round or None)
        if resume_round:
            store.drop_after(run_id, resume_round)
    if state is not None:
        try:
            trainer.restore(state)
        except CheckpointError as exc:
            log.warning("checkpoint of round %s does not fit the job: %s", state["round"], exc)
            state = None
    if state is None:
        trainer.applied_round = resume_round
        return None
    log.info("resumed from the local checkpoint of round %d", state["round"])
    return int(state["round"])


def save_checkpoint(
    trainer: ClientTrainer, store: CheckpointStore | None, run_id: str, round_: int
) -> None:
    """A local checkpoint of ``round_``, if checkpoints are on; a disk error is only logged."""
    if store is None:
        return
    try:
        store.save(run_id, round_, trainer.checkpoint())
    except OSError as exc:  # a full or read-only disk must not stop the run
        log.warning("cannot write a checkpoint: %s", exc)
