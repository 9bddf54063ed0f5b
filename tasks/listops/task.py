"""ListOps: the value of a nested list expression, 10 classes, as sequences grow.

``attnbench run --mechanism set --task listops --seq-len 512`` trains the shared sequence encoder
(``tasks.common.sequence``) to read an expression such as ``[MAX 4 [MIN 2 3 ] 1 ]`` token by
token and classify its value (0-9), the Long Range Arena task of hierarchical structure over long
contexts. Without ``--data`` the expressions are generated for the length (``generator.py``:
``[ceil(0.8 N), N]`` tokens, depth up to ``--max-depth``, 2 to ``--max-args`` arguments, written
once to the cache, ``embedded.py``); ``--data DIR`` reads LRA's own files (``data.py``). The
validation split (``val_accuracy``, what the accuracy sweep tunes on) is LRA's ``basic_val.tsv``, or
``--val-size`` generated expressions, none of them in training or test.

``chance`` is the majority class's share of the test split (predicting the training split's
most common label): the labels are skewed, 0 and 9 most common, so 10 % would flatter a model
that learned only the prior.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from attnbench import TaskError, register_task
from attnbench.validate import SEED_MAX, int_in
from tasks.common.harness import Data
from tasks.common.sequence import SequenceTask, sequence_table
from tasks.listops import data, embedded
from tasks.listops.generator import NUM_CLASSES, VOCAB, check_limits

RECIPE = dict(size="seq-tiny", epochs=2, batch_size=64, lr=3e-3, weight_decay=0.01, warmup_epochs=0.2,
              min_lr=0.0, label_smoothing=0.0, clip_grad=1.0, ema=0.0, workers=0, eval_every=1)
PRESETS: dict[str, dict[str, Any]] = {
    # generated expressions, as many at every length: 500 steps, about a minute of softmax at 128 tokens
    # on 2 cores
    "embedded": dict(RECIPE, seq_len=128, train_size=16_000, test_size=1_000, val_size=1_000, max_depth=10,
                     max_args=10),
    # LRA's files (96k train, 2k test, up to 2,000 tokens): its length, an encoder near its size
    "listops": dict(RECIPE, size="seq-base", seq_len=2000, epochs=2, lr=1e-3, warmup_epochs=0.2),
}
GENERATOR_OPTIONS = ("max_depth", "max_args", "train_size", "test_size", "val_size", "data_seed")

# The accuracy sweep's defaults (``attnbench scale --task listops``) per device kind, in one place to
# calibrate: CPU, lengths a 2-core CPU trains in a minute or two each (the "embedded" preset);
# CUDA, LRA's length in bf16 on a larger generated set.
MECHANISMS = ["softmax", "set", "linear", "performer", "nystromformer"]
SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"seq": [64, 128, 256], "mechanisms": list(MECHANISMS), "seeds": [0], "args": []},
    "cuda": {"seq": [2048], "mechanisms": list(MECHANISMS), "seeds": [0],
             "args": ["--amp", "bf16", "--train-size", "20000", "--test-size", "2000", "--epochs", "3"]},
}


@register_task
class ListOps(SequenceTask):
    name = "listops"
    summary = "ListOps (LRA): the value of nested MAX/MIN/MED/SM expressions, 10 classes, generated to " \
              "--seq-len (or LRA's files)"
    presets, sweep_presets = PRESETS, SWEEP_PRESETS
    columns, config_columns = sequence_table(("max_depth", "max_args"), measured=("truncated",))
    data_help = data.LAYOUT
    vocab_size, num_classes = len(VOCAB), NUM_CLASSES
    validation_split = True

    @classmethod
    def add_task_arguments(cls, g: argparse._ArgumentGroup) -> None:
        super().add_task_arguments(g)
        g.add_argument("--max-depth", type=int_in(2, 100),
                       help="levels of a generated expression, the root's and the digits' included "
                            f"(default {PRESETS['embedded']['max_depth']}, as LRA)")
        g.add_argument("--max-args", type=int_in(2, 100),
                       help=f"arguments per operator, at most (default {PRESETS['embedded']['max_args']}, "
                            "as LRA)")
        g.add_argument("--train-size", type=int_in(1, 10**6),
                       help=f"generated training expressions (default {PRESETS['embedded']['train_size']})")
        g.add_argument("--test-size", type=int_in(1, 10**6),
                       help=f"generated test expressions (default {PRESETS['embedded']['test_size']})")
        g.add_argument("--val-size", type=int_in(1, 10**6),
                       help=f"generated validation expressions, scored once after training "
                            f"(default {PRESETS['embedded']['val_size']})")
        g.add_argument("--data-seed", type=int_in(0, SEED_MAX),
                       help="seed of the generated expressions, apart from --seed (default 0)")

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        if args.data is not None:
            given = [k for k in GENERATOR_OPTIONS if getattr(args, k) is not None]
            if given:
                raise TaskError(f"--{given[0].replace('_', '-')} sets the generated expressions; --data "
                                "reads LRA's files as they are")
            self.setting = None
            return
        self.setting = embedded.Setting(self.seq_len, self.pick("max_depth"), self.pick("max_args"),
                                        args.data_seed or 0, self.pick("train_size"), self.pick("test_size"),
                                        self.pick("val_size"))
        for key in ("train_size", "test_size", "val_size"):
            if getattr(self.setting, key) < 1:
                raise TaskError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self.setting, key)}")
        check_limits(self.seq_len, self.setting.max_depth, self.setting.max_args)

    def load_data(self) -> Data:
        if self.setting is None:
            root = self.args.data.expanduser()
            name, description = f"lra:{root.resolve().name}", ""
        else:
            root = embedded.embedded_dataset(self.setting)
            name, description = self.setting.name, self.setting.describe()
        splits, self.truncated = data.read_lra(root, self.seq_len)
        if self.truncated:
            self.log(f"warning: {self.truncated} expressions longer than --seq-len {self.seq_len} were cut "
                     "to it")
        train, test = splits["train"].labels, splits["test"].labels
        self.chance = 100 * float(np.mean(test == np.bincount(train, minlength=NUM_CLASSES).argmax()))
        self.label_shares = (np.bincount(test, minlength=NUM_CLASSES) / len(test)).round(4).tolist()
        self.validation = data.sequence_set(splits["val"])
        return Data(name, data.sequence_set(splits["train"]), data.sequence_set(splits["test"]), None, root,
                    description)

    def generator_limits(self) -> dict[str, int | None]:
        """The generator's limits (None for LRA's files)."""
        if self.setting is None:
            return {"max_depth": None, "max_args": None}
        return {"max_depth": self.setting.max_depth, "max_args": self.setting.max_args}

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self.generator_limits()}

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {**super().row(metrics), **self.generator_limits(), "truncated": self.truncated}

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "truncated": self.truncated, "test_label_shares": self.label_shares}

