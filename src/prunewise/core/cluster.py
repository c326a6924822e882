"""Ray, optional (``pip install 'prunewise[ray]'``): connecting to a cluster and naming what went wrong on it.

Address values (the recipe's ``ray`` field, ``--ray [ADDRESS]``): ``default`` (the cluster ``RAY_ADDRESS``
names, else a new local instance on this machine's cores), ``local`` (always a new local instance), ``auto``
(the cluster ``ray start`` runs on this machine) or an address (``ray://head:10001``, ``head:6379``).
"""

from __future__ import annotations

import logging
import os

from ..errors import PrunewiseError

log = logging.getLogger(__name__)

RAY_REQUIREMENT = "ray==2.60.0"  # the version pyproject's `ray` extra pins
MAX_RETRIES = 2  # a task whose worker process dies is run again at most this many times


def require_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PrunewiseError(f"--ray needs Ray, which is not installed: pip install 'prunewise[ray]' "
                             f"(installs {RAY_REQUIREMENT}), or run without --ray") from None
    return ray


def connect(address: str | None):
    """Connect this process to Ray (once): returns the ``ray`` module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    env = {k: v for k, v in os.environ.items() if k in ("PRUNEWISE_CACHE", "HF_HOME", "HF_HUB_OFFLINE")}
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if env:  # workers find the same cache (a cluster's nodes need it mounted at the same path)
        kwargs["runtime_env"] = {"env_vars": env}
    target = None if address in (None, "", "default") else address
    if target is None and os.environ.get("RAY_ADDRESS"):
        target = os.environ["RAY_ADDRESS"]
    try:
        if target in (None, "local"):
            ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
        else:
            ray.init(address=target, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunewiseError(f"cannot connect to the Ray cluster at {target!r} ({first}); start one with "
                             "`ray start --head`, pass its address to --ray, or use --ray local") from None
    resources = ray.cluster_resources()
    log.info("ray: %s CPUs, %s GPUs, %d nodes", resources.get("CPU", 0), resources.get("GPU", 0), len(ray.nodes()))
    return ray


def cluster_cpus() -> float:
    ray = require_ray()
    return float(ray.cluster_resources().get("CPU", 0))


def error_line(exc: BaseException) -> str:
    """One line for a failed task: the exception the task raised (not Ray's wrapper), or how its worker died."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if name in ("WorkerCrashedError", "ActorDiedError", "NodeDiedError", "OutOfMemoryError"):
        text = f"its worker died {MAX_RETRIES + 1} times ({name}); the last: {text[:300]}"
    return f"{name}: {text[:500]}"
