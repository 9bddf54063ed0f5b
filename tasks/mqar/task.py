"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023), causal or bidirectional.

``attnbench run --task mqar --mechanism set --seq-len 512`` generates the sequences from the seed
(``data.py``: key-value pairs, then a query of each key among fillers at power-law gaps), trains
the shared encoder (``tasks.common.sequence``) to name, at every query, the value bound to its key,
and evaluates recall (accuracy at the queries, %) on a test split drawn apart from training, and
once more, after training, on a validation split (``--val-examples``, default as many as the test
split: a third stream of the seed, none of its sequences in training or test; ``val_accuracy``, what
the accuracy sweep tunes the learning rate on). The
harder the recall, the more it separates attention that can look anything up from mechanisms that
compress the context: longer sequences hold more pairs (``--kv-pairs``, default seq_len / 16, as
Zoology's figure 2: 4 pairs at 64 tokens, 16 at 256).

``--form causal`` is Zoology's ``multiquery_ar`` as Zoology trains it: read left to right (every
mechanism in its causal form), the target at each query the next token, the value, predicted over
the whole vocabulary, random filler, a vocabulary larger than n. ``--form bidirectional`` (the
default, so that the rows and reference sweeps recorded before the causal form existed keep their
meaning) reads the whole sequence at once and classifies the value among the values. The form is a
column of every row.

There is nothing to download: the embedded data set is the generator. Each run appends a row to
``results/local/mqar.csv``; ``attnbench scale --task mqar`` runs the accuracy sweep over
``sweep_presets`` (CPU: five mechanisms at 64…160 tokens; CUDA: up to 16,384 in bf16), and
``attnbench scale --task mqar -- --form causal`` over the causal form's presets (the mechanisms
with a causal form).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from attnbench import TaskError, register_task
from attnbench.task import flag_value
from attnbench.validate import float_in, int_in
from tasks.common.harness import Data
from tasks.common.sequence import SequenceTask, sequence_table
from tasks.mqar import data

PRESETS: dict[str, dict[str, Any]] = {
    # generated data, calibrated on a 2-core CPU (bidirectional form): in 600 steps softmax recalls 100 %
    # from 64 to 160 tokens (pre-norm, a short convolution and one head: seq-tiny; at 32 tokens, 2 pairs
    # give too few labels to learn from, at 192 it has not found the keys yet), where linear attention
    # falls to 12 % at 128
    "embedded": dict(size="seq-tiny", seq_len=128, form="bidirectional", kv_divisor=16, gap_power=0.01,
                     dropout=0.0, train_examples=12_800, test_examples=1_000, val_examples=1_000, epochs=3,
                     batch_size=64,
                     lr=3e-3, weight_decay=0.01, warmup_epochs=0.3, min_lr=None, label_smoothing=0.0,
                     clip_grad=1.0, ema=0.0, workers=0, eval_every=1),
}
# what each form defaults to where they differ: the bidirectional form keeps attnbench's first settings;
# the causal form takes Zoology's random filler and a vocabulary larger than every CPU preset length
# (Zoology's own default, 8,192, is the CUDA presets': `--vocab 8192`)
FORM_DEFAULTS: dict[str, dict[str, Any]] = {
    "bidirectional": dict(vocab=128, filler="blank"),
    "causal": dict(vocab=1024, filler="random"),
}

# the accuracy sweep's defaults (`attnbench scale --task mqar`): on the CPU the embedded preset at four
# lengths, about 13 minutes on 2 idle cores; on CUDA Zoology's range up to 16,384 tokens in bf16
SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(seq=[64, 96, 128, 160], seeds=[0], args=[],
                mechanisms=["softmax", "set", "linear", "performer", "nystromformer"]),
    "cuda": dict(seq=[256, 1024, 4096, 16384], seeds=[0, 1, 2],
                 mechanisms=["sdpa", "set", "linear", "performer", "nystromformer"],
                 args=["--amp", "bf16", "--size", "seq-base", "--vocab", "8192", "--train-examples", "100000",
                       "--epochs", "4"]),
}
# the causal form's (`attnbench scale --task mqar -- --form causal`): the mechanisms with a causal form.
# CPU: vocabulary 256, blank filler and 6 epochs (1,200 steps), calibrated on 2 cores: softmax recalls
# 99.97 % at 64 tokens and 100 % at 96 (its loss drops at the third epoch), but 12 % at 128 (6.5 % with
# --lr 1e-2) and 3.8 % at 64 with Zoology's random filler in 600 steps, so the preset stops at 96;
# CUDA: Zoology's vocabulary, 8,192, its random filler, and lengths below the vocabulary (Zoology
# asserts vocab_size > input_seq_len)
CAUSAL_MECHANISMS = ["softmax", "linear", "performer", "retnet", "gla", "gated_deltanet", "mamba2", "based"]
CAUSAL_SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(seq=[64, 96], seeds=[0], args=["--vocab", "256", "--filler", "blank", "--epochs", "6"],
                mechanisms=list(CAUSAL_MECHANISMS)),
    "cuda": dict(seq=[256, 512, 1024, 2048, 4096], seeds=[0, 1, 2],
                 mechanisms=["sdpa", *CAUSAL_MECHANISMS[1:]],
                 args=["--amp", "bf16", "--size", "seq-base", "--vocab", "8192", "--train-examples", "100000",
                       "--epochs", "4"]),
}


@register_task
class Mqar(SequenceTask):
    name = "mqar"
    summary = ("multi-query associative recall (Zoology): generated key-value recall at any length, causal "
               "(Zoology's next-token form) or bidirectional")
    presets, sweep_presets = PRESETS, SWEEP_PRESETS
    columns, config_columns = sequence_table(("form", "kv_pairs", "gap_power", "filler"))
    per_token = True
    validation_split = True

    @classmethod
    def sweep_preset(cls, device: str, task_args: Sequence[str]) -> dict[str, Any] | None:
        """The causal form's presets when the sweep's task arguments ask for ``--form causal``."""
        causal = flag_value(task_args, "--form") == "causal"
        return (CAUSAL_SWEEP_PRESETS if causal else cls.sweep_presets).get(device)

    @classmethod
    def add_task_arguments(cls, g: argparse._ArgumentGroup) -> None:
        super().add_task_arguments(g)
        g.add_argument("--form", choices=data.FORMS,
                       help="causal: Zoology's multiquery_ar, read left to right, next-token targets over "
                            "the whole vocabulary (mechanisms with a causal form only); bidirectional: the "
                            f"whole sequence read at once, the value classified ({cls._defaults('form')})")
        g.add_argument("--vocab", type=int_in(6, 2**18),
                       help="bidirectional: the vocabulary, pad, blank, then keys and values half and half; "
                            "causal: Zoology's vocab_size V (> --seq-len), ids shifted up by one so 0 stays "
                            f"padding (default: {cls._form_defaults('vocab')})")
        g.add_argument("--kv-pairs", type=int_in(1, 65536),
                       help=f"key-value pairs per sequence (default: seq_len / "
                            f"{PRESETS['embedded']['kv_divisor']}, at least 1)")
        g.add_argument("--gap-power", type=float_in(0, 100, lo_open=True),
                       help="power a of the query gaps' law, p(gap) ∝ gap^(a-1): small a puts queries "
                            "soon after the pairs, 1 is uniform (Zoology's power_a; "
                            f"{cls._defaults('gap_power')})")
        g.add_argument("--filler", choices=data.FILLERS,
                       help="between queries: a blank token, or random tokens (Zoology's random_non_queries: "
                            "the causal form draws them from the whole vocabulary, the bidirectional one "
                            f"from the keys and values) (default: {cls._form_defaults('filler')})")
        g.add_argument("--train-examples", type=int_in(1, 10**6),
                       help=f"generated training sequences ({cls._defaults('train_examples')})")
        g.add_argument("--test-examples", type=int_in(1, 10**6),
                       help=f"generated test sequences ({cls._defaults('test_examples')})")
        g.add_argument("--val-examples", type=int_in(1, 10**6),
                       help="generated validation sequences, none in training or test: scored once after "
                            f"training, val_accuracy ({cls._defaults('val_examples')})")

    @classmethod
    def _form_defaults(cls, key: str) -> str:
        """"1024 causal, 128 bidirectional": a setting whose default depends on the form."""
        return ", ".join(f"{values[key]} {form}" for form, values in FORM_DEFAULTS.items())

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        self.form: str = self.pick("form")
        if self.form not in data.FORMS:
            raise TaskError(f"--form {self.form!r}: valid choices: {', '.join(data.FORMS)}")
        self.causal = self.form == "causal"
        defaults = FORM_DEFAULTS[self.form]
        self.vocab, self.filler = (defaults[k] if getattr(args, k) is None else getattr(args, k)
                                   for k in ("vocab", "filler"))
        self.gap_power = self.pick("gap_power")
        kv_pairs = args.kv_pairs
        if kv_pairs is None:
            kv_pairs = max(1, self.seq_len // self.preset["kv_divisor"])
        self.layout = data.Layout(self.vocab, self.seq_len, kv_pairs, self.form)
        problem = self.layout.problem()
        if problem is not None:
            raise TaskError(problem)
        if not self.gap_power > 0:
            raise TaskError(f"--gap-power must be > 0 (1: uniform gaps), got {self.gap_power}")
        self.examples = {split: self.pick(f"{split}_examples") for split in ("train", "test", "val")}
        for split, count in self.examples.items():
            if count < 1:
                raise TaskError(f"--{split}-examples must be >= 1, got {count}")
        # causal: next-token prediction over every token id (as Zoology's loss); bidirectional: the values
        layout = self.layout
        self.vocab_size, self.num_classes = layout.tokens, layout.tokens if self.causal else layout.num_values
        self.chance = 100 / layout.num_values  # guessing among the values

    def load_data(self) -> Data:
        (train_ids, train_labels), (test_ids, test_labels) = data.splits(
            self.layout, self.examples["train"], self.examples["test"], self.recipe.seed, self.gap_power,
            self.filler)
        val_ids, val_labels = data.validation_split(self.layout, self.examples["val"], self.recipe.seed,
                                                    (train_ids, test_ids), self.gap_power, self.filler)
        layout = self.layout
        return self.sequence_data(  # full length: no mask
            "mqar", (train_ids, None, train_labels), (test_ids, None, test_labels),
            val=(val_ids, None, val_labels),
            description=f"MQAR ({self.form}) generated from seed {self.recipe.seed}: {len(train_ids)} train "
                        f"/ {len(test_ids)} test / {len(val_ids)} validation sequences of {layout.seq_len} "
                        f"tokens, {layout.kv_pairs} key-value pairs, vocabulary {layout.vocab}"
                        f"{' (Zoology ids + 1)' if self.causal else ''}, gap power {self.gap_power}, "
                        f"{self.filler} filler")

    def own_settings(self) -> dict[str, Any]:
        """The task's own settings, in its config and its row."""
        return {"form": self.form, "kv_pairs": self.layout.kv_pairs, "gap_power": self.gap_power,
                "filler": self.filler}

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self.own_settings()}

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {**super().row(metrics), **self.own_settings()}

    def describe_model(self) -> str:
        reading = "causal " if self.causal else ""
        return f"{reading}{super().describe_model()} ({self.layout.kv_pairs} key-value pairs)"
