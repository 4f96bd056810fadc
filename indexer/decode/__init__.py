"""Files -> 8-bit pixels and the metadata the index keeps (`decode_bytes`, `decode_file`)."""
from .dicom import (DICOM_SUFFIXES, IMAGE_SUFFIXES, DecodeError, Decoded, TransientDecodeError, content_hash,
                    decode_bytes, decode_file, dicom_metadata, reduction_level, sniff_kind)

__all__ = ["DICOM_SUFFIXES", "IMAGE_SUFFIXES", "DecodeError", "Decoded", "TransientDecodeError", "content_hash",
           "decode_bytes", "decode_file", "dicom_metadata", "reduction_level", "sniff_kind"]
