"""Allocation: how the budget is spread over layers, modules and rows. One file per method, registered here."""

from . import methods, profile, search  # noqa: F401  (registration)
from .base import Allocation, AllocationContext

__all__ = ["Allocation", "AllocationContext"]
