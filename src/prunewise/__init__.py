"""prunewise: prune large language models for the task you care about."""

from .errors import PrunewiseError

__version__ = "0.1.0"
__all__ = ["PrunewiseError", "__version__"]
