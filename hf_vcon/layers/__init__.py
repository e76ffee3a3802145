"""The VCON units that replace or parametrize a model's weights: :class:`~hf_vcon.VConLinear` (:mod:`.linear`),
:class:`~hf_vcon.layers.weight.VConWeight` (:mod:`.weight`), both on the protocol of :mod:`.protocol`;
:class:`~hf_vcon.VConBlock` (:mod:`.block`, outputs blended by :mod:`.block_outputs`); and the factory that picks
one for a targeted name (:mod:`.factory`).
"""

