"""MQAR (``--task mqar``): multi-query associative recall after Zoology (Arora et al. 2023), in its
bidirectional form, at any sequence length.

    attnbench run --task mqar --mechanism set --seq-len 512      # one run: recall at the queries, %
    attnbench run --task mqar --mechanism softmax --seq-len 128 --kv-pairs 16 --vocab 1024

``data.py`` generates the sequences from the seed (numpy, vectorised; train and test drawn apart),
``task.py`` trains the shared encoder of ``tasks.common.sequence`` on them and records the row the
accuracy sweep (``attnbench scale --task mqar``) reads.
"""

from tasks.mqar.task import Mqar

__all__ = ["Mqar"]
