"""`python -m batch_caption.report`: one run's output as one self-contained HTML page.

    page         the page and the command line (__main__ runs page.main)
    thumbnails   the thumbnails, read and decoded the way the run decoded its images
    overlay      a record's attention maps -> a grid of cells over its thumbnail

This `__init__` imports nothing, so importing one module of the package runs no other.
"""
