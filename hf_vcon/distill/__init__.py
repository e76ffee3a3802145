"""Distillation from the dense teacher: the losses (:mod:`.losses`), the Trainer mixin (:mod:`.mixin`), the
teacher itself (:mod:`.teacher`) and cached teacher logits (:mod:`.cached_logits`).
"""

