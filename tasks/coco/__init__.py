"""COCO detection and instance segmentation (``--task coco``): the 2017 layout (``data.py``), the
embedded composites (``embedded.py``), Mask R-CNN on the SeTformer backbone (``model.py``),
COCOeval (``metrics.py``), the AP plots (``plots.py``) and the task (``task.py``)."""

from tasks.coco.task import Coco

__all__ = ["Coco"]
