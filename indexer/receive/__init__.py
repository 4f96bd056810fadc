"""Images sent to us: a DICOM C-STORE receiver (scp.py) and the folder that keeps what arrives and
indexes it in the background (arrivals.py)."""
from .arrivals import OUT_OF_SPACE, ArrivalIndexer, InstanceFolder, UnsafeUIDError  # noqa: F401
from .scp import Receiver, ReceiverError, allowed_callers, tls_context  # noqa: F401
