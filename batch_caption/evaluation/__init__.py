"""What `python -m batch_caption.evaluate` scores captions with.

    metrics      COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap)

This `__init__` imports nothing, so importing one module of the package runs no other.
"""
