"""prunewise: prune large language models for the task you care about."""

from ._version import __version__
from .errors import PrunewiseError


def _register() -> None:
    """Pruned folders with per-block widths load with plain from_pretrained once prunewise is imported."""
    try:
        from .export.register import register_pruned_classes
    except ImportError:  # transformers missing: prunewise reports that where it is needed
        return
    register_pruned_classes()


_register()


def __getattr__(name):  # the API imports torch and transformers: load it on first use
    if name in ("prune", "evaluate", "run", "PruneResult"):
        from . import api
        return getattr(api, name)
    if name in ("Recipe", "make_recipe"):
        from . import recipe
        return getattr(recipe, name)
    raise AttributeError(name)


__all__ = ["PrunewiseError", "__version__", "prune", "evaluate", "run", "PruneResult", "Recipe", "make_recipe"]
