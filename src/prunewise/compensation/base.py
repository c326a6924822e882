"""What every compensation shares: the compensation part interface."""

from __future__ import annotations

from ..core.registry import Part
from ..core.stats import NONE, Needs


class Compensation(Part):
    """Updates what survives a selection so that the pruned layer's output stays close to the dense one.

    Weight-level compensations (``reconstructs``) turn a weight, its statistics and a mask (or a
    saliency to choose the mask with during the update) into the pruned weight; structured ones
    (``bias``) act when units are sliced away. Mask refiners (``refines_mask``) change which weights are
    pruned, row counts kept, from the dense weight and its statistics.
    """

    needs: Needs = NONE
    reconstructs = False
    sweeps = False  # chooses the mask inside its own column sweep from a score's saliency (OBS, for SparseGPT)
    chooses_mask = False  # starts from a mask on the dense weight and returns the one it converged to (ALPS, ADMM)
    default_group: str | None = None  # the unstructured comparison group its reference uses, when the recipe names none
    refines_mask = False  # turns a selected mask into a better one before any reconstruction (DSnoT)
    adds_lowrank = False  # after everything, a low-rank correction kept beside the pruned weight (EoRA)

    def check(self, module_name: str, weight) -> None:
        """Refuse, before any pruning, a targeted linear this part cannot work on (only its shape is read)."""
        return None
