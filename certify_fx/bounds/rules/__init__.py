"""The rule families of the bound compiler; importing this package registers every rule.

The contract a rule follows (what it receives, which arguments it must account for, how it
refuses) is written in :mod:`certify_fx.bounds.registry`. Families:

* :mod:`.activations`: elementwise and groupwise nonlinearities, max/sort/topk values;
* :mod:`.linear`: arithmetic with constants, dense layers, convolutions and their transposes;
* :mod:`.pooling`: max/average pooling, resampling, sums and means;
* :mod:`.normalization`: eval-mode BatchNorm, Affine, timm's BatchNormAct2d;
* :mod:`.orthogonal`: the skew-orthogonal convolution (SOC), with its proven truncation bound;
* :mod:`.shape`: reshapes, permutations, indexing, splits, concatenation, padding, copies, casts;
* :mod:`.refusals`: operations refused with a specific reason and fix (LayerNorm, attention, RNNs,
  random ops).
"""

from . import activations, linear, normalization, orthogonal, pooling, refusals, shape

__all__ = ["activations", "linear", "normalization", "orthogonal", "pooling", "refusals", "shape"]
