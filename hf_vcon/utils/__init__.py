"""Helpers every stage may use (they import nothing else of hf_vcon but ``errors``): Linear/Conv1D orientation
(:mod:`.linears`), module replacement and unwrapping (:mod:`.modules`), PEFT adapter detection (:mod:`.peft`) and
the names of what a run logs (:mod:`.logs`).
"""

