"""Image bytes -> a fixed-size RGB uint8 array, or a typed, explained error.

    decoding     decode_image: the size limit, EXIF orientation, JPEG draft, resize
    formats      what bytes are (sniff), the formats allow-list, any Pillow mode -> RGB
    errors       the errors decode_image raises for bad data, and what counts as bad data

The job, prepare, the report's thumbnails and the Python API all decode through here.
This `__init__` imports nothing, so importing one module of the package runs no other.
"""
