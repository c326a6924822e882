"""Compensations: what updates the survivors after a selection. One file per part, registered here."""

from . import admm, alps, bias, dsnot, eora, merge, obs, refit  # noqa: F401  (registration)
from .base import Compensation

__all__ = ["Compensation"]
