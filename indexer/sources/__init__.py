"""Where images come from: the `Source` protocol, folders on disk, and (in their own modules,
imported on demand) a PACS over DICOMweb or DIMSE."""
from .base import BoundedRetrievals, Item, Source
from .folders import FolderSource, walk

__all__ = ["BoundedRetrievals", "FolderSource", "Item", "Source", "walk"]
