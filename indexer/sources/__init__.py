"""Where images come from: the `Source` protocol, folders on disk, and (in their own modules,
imported on demand) a PACS over DICOMweb or DIMSE."""
from .base import BoundedRetrievals, FolderSource, Item, Source, walk

__all__ = ["BoundedRetrievals", "FolderSource", "Item", "Source", "walk"]
