"""Structured pruning: whole neurons and attention heads go, and the merged model is a smaller model of the same
architecture. The pruner (:mod:`.pruner`, the ``structured`` compression), which layers prune together
(:mod:`.plan`) and the per-architecture coupling tables (:mod:`.couplings`: the one place to add an architecture).
"""


from . import pruner  # noqa: F401  (registers the ``structured`` compression)
