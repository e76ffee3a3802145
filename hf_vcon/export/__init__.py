"""From a trained model to files: the merged dense checkpoint (:mod:`.merged`), compressed-tensors
(:mod:`.compressed_tensors`), the compact format (:mod:`.compact_save`, :mod:`.compact_load`), a training
checkpoint's export (:mod:`.from_checkpoint`), what a run writes at its end (:mod:`.run`), the model card
(:mod:`.card`), the measured speed-up (:mod:`.speed`) and the files a folder holds (:mod:`.files`).
"""

