"""Sequential image classification: LRA's "Image" task, pixels as a 1-D sequence of intensity tokens.

``attnbench run --task seqimage --mechanism set`` classifies the embedded MNIST-5k digits, each
resized to side × side with side² = ``--seq-len`` (default 784: the native 28 × 28) and read row by
row as 256-level grayscale tokens, with the shared encoder of ``tasks.common.sequence``: no 2-D
structure is given to the model, so a class depends on pixels far apart in the sequence.
``--data DIR`` reads CIFAR-10 (``DIR/cifar-10-batches-py``, the python version) in grayscale, LRA's
1,024 tokens; another square ``--seq-len`` resizes its images too (choice: one code path for every
length, so a sweep over lengths is possible; only 1,024 is LRA's setting). The row records chance
(10 %) beside the accuracy, and ``side``. A tenth of the training images is held out as the
validation split (``data.hold_out``; ``val_accuracy``, what the accuracy sweep tunes on).
"""

from __future__ import annotations

import argparse
from typing import Any

from attnbench import TaskError, register_task
from tasks.common import mnist5k
from tasks.common.harness import Data
from tasks.common.sequence import SequenceTask, sequence_table
from tasks.seqimage import data

PRESETS: dict[str, dict[str, Any]] = {
    # CIFAR-10 from --data: LRA's Image (1,024 grayscale tokens); a GPU job
    "seqimage": dict(size="seq-base", seq_len=1024, dropout=0.1, epochs=20, batch_size=64, lr=1e-3,
                     weight_decay=0.05, warmup_epochs=1, min_lr=None, label_smoothing=0.0, clip_grad=1.0,
                     ema=0.0, workers=0, eval_every=1),
    # the embedded MNIST-5k (3,600 train, 400 held out for validation / 1,000 test); each entry is meant to be
    # tuned
    "embedded": dict(size="seq-tiny", seq_len=784, dropout=0.1, epochs=2, batch_size=32, lr=1e-3,
                     weight_decay=0.05, warmup_epochs=0.2, min_lr=None, label_smoothing=0.0, clip_grad=1.0,
                     ema=0.0, workers=0, eval_every=1),
}

# the accuracy sweep's defaults (`attnbench scale --task seqimage`): squares only
SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(seq=[64, 144, 256, 576], seeds=[0], args=["--epochs", "1"],
                mechanisms=["softmax", "set", "linear", "performer", "nystromformer"]),
    "cuda": dict(seq=[256, 576, 1024, 4096], seeds=[0, 1, 2], args=["--amp", "bf16", "--epochs", "10"],
                 mechanisms=["sdpa", "set", "linear", "performer", "nystromformer"]),
}


@register_task
class SeqImage(SequenceTask):
    name = "seqimage"
    summary = ("pixel-level image classification as a 1-D token sequence (LRA Image): embedded MNIST-5k, or "
               "CIFAR-10 in grayscale")
    presets, sweep_presets = PRESETS, SWEEP_PRESETS
    columns, config_columns = sequence_table(("side",))
    data_help = "a folder holding cifar-10-batches-py/ (CIFAR-10's python version), read in grayscale"
    vocab_size, num_classes = data.LEVELS + 1, 10  # token 0 pads
    validation_split = True

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        side = data.square_side(self.seq_len)
        if side is None:
            lower = int(self.seq_len ** 0.5)
            raise TaskError(f"--seq-len {self.seq_len} is not a square: seqimage reads side × side pixels; "
                            f"use {lower * lower} ({lower}²) or {(lower + 1) ** 2} ({lower + 1}²)")
        self.side = side

    def load_data(self) -> Data:
        if self.args.data is None:
            (train, test), name = data.mnist(), mnist5k.EMBEDDED_NAME
            root, source = None, mnist5k.EMBEDDED_DESCRIPTION
        else:
            root = self.args.data.expanduser()
            (train, test), name = data.cifar10(root), "cifar10-gray"
            source = f"CIFAR-10 from {root.resolve().name}/{data.CIFAR_FOLDER}, grayscale (ITU-R 601 luma)"
        train, val = data.hold_out(train)
        native = train[0].shape[1]
        resized = "" if native == self.side else f", resized from {native}² to {self.side}²"
        train_set, test_set, val_set = ((data.tokens(images, self.side), None, labels)
                                        for images, labels in (train, test, val))
        return self.sequence_data(  # every pixel a real token: no mask
            name, train_set, test_set, root=root, val=val_set,
            description=f"{source}: {len(train[0])} train ({len(val[0])} more held out for validation) / "
                        f"{len(test[0])} test images as {self.seq_len} pixel tokens{resized}")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "side": self.side}

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {**super().row(metrics), "side": self.side}

    def describe_model(self) -> str:
        return f"{super().describe_model()} ({self.side}² pixels)"
