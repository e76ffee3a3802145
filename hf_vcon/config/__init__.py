"""What to compress and when: :class:`~hf_vcon.VConConfig` (:mod:`.vcon_config`), per-module settings
(:mod:`.settings`), PEFT's target grammar (:mod:`.targets`) and the β schedules (:mod:`.schedules`).
"""

