"""ImageNet's data: the ImageNet folder layout (``tasks.common.image_folder``), and the small
real data set written into that layout when there is no ``--data``.

The embedded default: MNIST-5k (``tasks.common.mnist5k``, shared with seqimage), 5,000 real
digits written once as PNGs into ``train/digit<k>/`` and ``val/digit<k>/`` under the cache and
read through the very same ``ImageFolder`` code as ImageNet, so the default run exercises the
real path.
"""

from tasks.common.mnist5k import EMBEDDED_DESCRIPTION, EMBEDDED_NAME, EMBEDDED_VAL_PER_CLASS, embedded_dataset

__all__ = ["EMBEDDED_DESCRIPTION", "EMBEDDED_NAME", "EMBEDDED_VAL_PER_CLASS", "embedded_dataset"]
