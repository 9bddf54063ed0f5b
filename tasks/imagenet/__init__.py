"""ImageNet classification (``--task imagenet``): the ImageNet layout or the embedded MNIST-5k
(``data.py``), the SeTformer classifier (``tasks.common.backbone``), top-1/top-5 (``task.py``)."""

from tasks.imagenet.task import ImageNet

__all__ = ["ImageNet"]
