"""Putting units into a model and driving them: the verbs (:mod:`.verbs`: ``apply_vcon``, ``set_step``,
``merge_and_unload`` …), the state a patched model carries (:mod:`.state`, :mod:`.tensors`), the target plan
(:mod:`.plan`), the two granularities (:mod:`.layerwise`, :mod:`.blockwise`), the transitions (:mod:`.transitions`),
sharded weights (:mod:`.distributed`) and the size summary (:mod:`.summary`).
"""

