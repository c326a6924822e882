"""The Python API: ``prune(recipe)``, ``evaluate(...)``, ``run(recipe)`` and ``apply_masks(...)``, the calls the CLI makes.

A thin front: the work is in ``pipeline/`` (the prune flow, and the evaluate-and-write path).
"""

from __future__ import annotations

from .core.masks import MaskSet
from .pipeline import moefy as _moefy  # noqa: F401  (registers the builder of the derived MoE models)
from .pipeline.prune import PruneResult, build_plan, peak_rss_mb, prune, targeted_numels
from .pipeline.reapply import apply_masks
from .pipeline.run import dense_key as _dense_key
from .pipeline.run import evaluate, run

__all__ = ["PruneResult", "MaskSet", "prune", "evaluate", "run", "apply_masks", "recover", "build_plan",
           "peak_rss_mb", "targeted_numels", "_dense_key"]


def recover(folder: str, recovery: list, output: str, masks: str | None = None, evaluation: list[str] | None = None,
            eval_tokens: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Recover a folder written by ``prunewise prune`` with ``recovery`` parts, keeping its saved masks (or ``masks``);
    the rest of the recipe (source model as teacher, calibration, dtype, device) is the folder's ``recipe.yaml``."""
    from pathlib import Path

    from .errors import PrunewiseError
    from .pipeline.recover import recover_folder
    from .recipe import make_recipe, read_recipe

    if not (Path(folder) / "recipe.yaml").is_file():
        raise PrunewiseError(f"{folder} has no recipe.yaml: give a folder written by prunewise prune")
    # the plan was followed already (its levels are the folder's zeros): not read again
    fields = {**read_recipe(Path(folder) / "recipe.yaml"), "recovery": recovery, "output": output,
              "overwrite": overwrite, "plan": None}
    if evaluation is not None:
        fields["evaluation"] = evaluation
    if eval_tokens is not None:
        fields["eval_tokens"] = eval_tokens
    return recover_folder(folder, make_recipe(**fields), masks, progress)
