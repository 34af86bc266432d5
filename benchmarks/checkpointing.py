"""Checkpoints of a run's state (parameters, optimizer state, BatchNorm statistics) with orbax.

The surface: ``checkpoint_manager(workdir)`` opens ``<workdir>/checkpoints``;
``save_checkpoint(manager, epoch, state)`` writes one epoch and waits for it;
``restore_checkpoint(manager, state)`` returns the latest ``(epoch, state)`` with ``state``'s
shardings, or None when there is none.
"""

from __future__ import annotations

import os
from typing import Any

import jax

CHECKPOINT_DIR = "checkpoints"


def checkpoint_manager(workdir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )


def save_checkpoint(manager, epoch: int, state: Any) -> None:
    import orbax.checkpoint as ocp

    leaves = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(state))}
    manager.save(epoch, args=ocp.args.StandardSave(leaves))
    manager.wait_until_finished()


def restore_checkpoint(manager, state: Any) -> tuple[int, Any] | None:
    """The latest saved epoch and state, or None when there is no checkpoint."""
    import orbax.checkpoint as ocp

    epoch = manager.latest_step()
    if epoch is None:
        return None
    leaves, treedef = jax.tree.flatten(state)
    abstract = {
        str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        for i, x in enumerate(leaves)
    }
    restored = manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
    return epoch, jax.tree.unflatten(treedef, [restored[str(i)] for i in range(len(leaves))])
