"""The Trainer integration: :class:`~hf_vcon.VConCallback` (:mod:`.callback`) carries the logic,
:class:`~hf_vcon.VConTrainer` (:mod:`.trainer`) stays thin; :mod:`.resume` checks a checkpoint before it is loaded.
"""

