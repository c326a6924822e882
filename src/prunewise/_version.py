"""The version, apart from the package import (lower layers read it without importing the API)."""

__version__ = "0.1.0"
