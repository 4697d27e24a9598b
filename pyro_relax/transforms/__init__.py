"""Bijections onto the simplex used by the relaxations."""

from pyro_relax.transforms.softmax_plus_plus import SoftmaxPlusPlusTransform
from pyro_relax.transforms.stick_breaking import SigmoidSticksTransform

__all__ = ["SigmoidSticksTransform", "SoftmaxPlusPlusTransform"]
