"""What several tasks share: the training harness (one epoch loop for every task), the
SeTformer backbone, the BERT-layout text encoder, the image-folder reader and the data cache."""
