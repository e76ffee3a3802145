"""Other libraries on top of a patched model: PEFT adapters on VCON layers (:mod:`.peft`).
"""

