"""ADE20K semantic segmentation (``--task ade20k``): the ADEChallengeData2016 layout and mmseg's
transforms (``data.py``), the embedded composites (``embedded.py``), UperNet on the SeTformer
backbone (``model.py``), mIoU from a confusion matrix (``metrics.py``), the mIoU plot
(``plots.py``) and the task (``task.py``)."""

from tasks.ade20k.task import ADE20K

__all__ = ["ADE20K"]
