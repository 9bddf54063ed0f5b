"""Task harnesses, one module each; importing this package registers them."""

from tasks import (  # noqa: F401  (each module registers its task)
    ade20k,
    coco,
    glue,
    imagenet,
)
