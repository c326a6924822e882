"""What every structure shares: the structure part interface."""

from __future__ import annotations

from ..core.registry import Part


class Structure(Part):
    """A structure: turns importance and a planned amount into a weight mask (weight level) or unit keeps."""

    fixed_sparsity = False  # N:M fixes the sparsity: N/M
    weight_level = True     # masks single weights (unstructured, N:M); False: removes units, a smaller model
    level_quantum = 0       # levels must be multiples of 1/level_quantum (N:M: 1/M); 0: any level

    def tile_width(self, blocksize: int) -> int:
        return blocksize

    def selector(self, shape: tuple[int, int], sparsity):
        """A callable ``importance -> mask`` for many selections at one level on matrices of ``shape`` (the iterates
        of an ADMM loop); the default is :meth:`mask` each time."""
        return lambda importance: self.mask(importance, sparsity)
