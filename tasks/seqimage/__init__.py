"""Sequential image (``--task seqimage``): LRA's "Image" task, an image as a 1-D sequence of its
grayscale pixels, one token per pixel, classified by the shared encoder of ``tasks.common.sequence``.

    attnbench run --task seqimage --mechanism set                # embedded MNIST-5k: 28² = 784 tokens
    attnbench run --task seqimage --mechanism set --seq-len 256  # the digits resized to 16²
    attnbench run --task seqimage --mechanism sdpa --data DIR    # CIFAR-10 (DIR/cifar-10-batches-py)

``data.py`` reads the images and turns them into tokens; ``task.py`` is the task.
"""

from tasks.seqimage.task import SeqImage

__all__ = ["SeqImage"]
