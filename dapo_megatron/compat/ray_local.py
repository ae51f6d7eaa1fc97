"""Patch of Ray's "local only" switch, so a single-node Ray listens on 127.0.0.1 only.

Why: ``ray.init(_node_ip_address="127.0.0.1")`` does not keep Ray on the loopback
interface.  ``ray._private.worker.init`` passes the address through
``services.resolve_ip_for_localhost``, which replaces any loopback address with
``get_node_ip_address()``, and that returns the address of the interface that routes
outward unless ``ray_constants.ENABLE_RAY_CLUSTER`` is False (Ray's Windows/macOS "local
only" mode).  The constant is read from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when
``ray._private.ray_constants`` is first imported, so the caller sets that variable before
importing ``ray`` and :func:`force_local_only` sets the constant in case Ray was imported
earlier.  Measured on ray 2.60.0; warned, not refused, outside the range, because the
reward pool checks the address Ray reports after ``ray.init`` and refuses anything but
127.0.0.1 (:func:`dapo_megatron.reward.ray_executor.ensure_ray`).
"""

from __future__ import annotations

from dapo_megatron.compat import guard

__all__ = ["LOCAL_ONLY_ENV", "force_local_only"]

# read by ray._private.ray_constants at import: "0" forces the local-only mode
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def force_local_only() -> None:
    """Switch an imported Ray to its local-only mode (the loopback node address is kept)."""
    guard("ray-local-only")
    from ray._private import ray_constants  # optional dependency: Ray, for the reward pool's executor='ray'

    ray_constants.ENABLE_RAY_CLUSTER = False
