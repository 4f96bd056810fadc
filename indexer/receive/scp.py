"""The DICOM receiver: a C-STORE SCP (pynetdicom) that keeps what modalities and the PACS send
under one folder (`indexer.receive.arrivals.InstanceFolder`) and hands each stored file to the indexing
thread (`indexer.receive.arrivals.ArrivalIndexer`).

- Storage SOP classes of radiography (CR, DX, mammography, intra-oral), CT, MR (and their
  enhanced forms), ultrasound (single and multi-frame) and secondary capture, plus
  Verification (C-ECHO). Other SOP classes are refused at negotiation (their presentation
  contexts rejected).
- Every transfer syntax this install's decoder reads (`decodable_transfer_syntaxes`), accepted
  as the sender proposes it first: the file is kept as sent, never transcoded.
- Statuses: 0x0000 once the file is on disk (written atomically); 0xC000 for a dataset that
  cannot be read or lacks its UIDs; 0xC001 for UIDs that cannot name a file; 0xA700 (out of
  resources: the sender retries later) when the disk is full; 0xC002 for another write error.
- Callers: with an allow list (`AllowedCaller`), any other calling AE title or host gets an
  A-ASSOCIATE-RJ (permanent, calling AE title not recognised); a called AE title other than
  ours is refused too. TLS when given a certificate and key (`tls_context`).
"""
from __future__ import annotations

import errno
import io
import logging
import socket
import ssl
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arrivals import OUT_OF_SPACE, InstanceFolder, UnsafeUIDError
from ..errors import MIError, one_line

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
UID_NOT_USABLE = 0xC001
CANNOT_STORE = 0xC002

RECEIVED_SOP_CLASSES = (
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing",
    "DigitalIntraOralXRayImageStorageForPresentation",
    "DigitalIntraOralXRayImageStorageForProcessing",
    "CTImageStorage",
    "EnhancedCTImageStorage",
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage",
    "SecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage",
)
DEFAULT_AE_TITLE = "MI"


class ReceiverError(MIError):
    """The receiver cannot start as asked (a bad allow list, TLS files, a port in use)."""


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data pydicom decodes with the plugins installed here
    (uncompressed, deflate, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    usable = []
    for syntax in AllTransferSyntaxes:
        try:
            if get_decoder(syntax).is_available:
                usable.append(str(syntax))
        except NotImplementedError:
            continue
    return usable


# ---------------------------------------------------------------- who may send
@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title that may associate, from `host` (its addresses), or from anywhere
    when `host` is None."""

    ae_title: str
    host: str | None = None
    addresses: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entry: str) -> AllowedCaller:
        """`AET@host` (a name or an address) or `AET` (from any host)."""
        ae_title, _, host = entry.strip().partition("@")
        ae_title = ae_title.strip()
        if not ae_title or len(ae_title) > 16 or "\\" in ae_title or not ae_title.isprintable():
            raise ReceiverError(f"{entry!r} is not AET@host: an AE title is 1 to 16 characters")
        if not host:
            return cls(ae_title)
        host = host.strip().strip("[]")
        try:
            found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError as e:
            raise ReceiverError(f"cannot resolve the host of {entry!r}: {e.strerror or e}") from None
        return cls(ae_title, host, frozenset(_plain_address(info[4][0]) for info in found))

    def admits(self, ae_title: str, address: str) -> bool:
        return ae_title.strip() == self.ae_title and (self.host is None or _plain_address(address) in self.addresses)


def _plain_address(address: str) -> str:
    """An IPv4 address for an IPv4-mapped IPv6 one (as a dual-stack socket reports callers)."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def allowed_callers(entries: Iterable[str] = (), files: Iterable[str | Path] = ()) -> list[AllowedCaller]:
    """The allow list from `--allow` entries and files (one entry a line; blank lines and lines
    starting with # ignored)."""
    lines = list(entries)
    for path in files:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ReceiverError(f"cannot read the allow list {path}: {getattr(e, 'strerror', None) or e}") from None
        lines += [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [AllowedCaller.parse(line) for line in lines]


def tls_context(cert: str | Path, key: str | Path, ca: str | Path | None = None) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 at least) from a certificate chain and its key; with `ca`,
    callers must present a certificate that CA signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
        if ca is not None:
            context.load_verify_locations(cafile=str(ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ReceiverError(f"cannot use the TLS certificate or key: {one_line(e)}") from None
    return context


# ---------------------------------------------------------------- the SCP
class Receiver:
    """A C-STORE SCP writing into `folder`. `arrived(path)` is called for each instance stored,
    `ended()` when an association ends."""

    def __init__(self, folder: InstanceFolder, *, ae_title: str = DEFAULT_AE_TITLE,
                 arrived: Callable[[Path], None] = lambda path: None, ended: Callable[[], None] = lambda: None,
                 allowed: Sequence[AllowedCaller] | None = None, ssl_context: ssl.SSLContext | None = None,
                 max_megapixels: float = 100.0, max_associations: int = 10):
        from pynetdicom import AE, evt
        from pynetdicom import sop_class as sop

        if not ae_title.strip() or len(ae_title) > 16:
            raise ReceiverError(f"the AE title {ae_title!r} must be 1 to 16 characters")
        self.folder, self.arrived, self.ended = folder, arrived, ended
        self.allowed = list(allowed) if allowed else None
        self.ssl_context, self.max_megapixels = ssl_context, max_megapixels
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        self.ae.maximum_associations = max_associations
        syntaxes = decodable_transfer_syntaxes()
        for name in RECEIVED_SOP_CLASSES:
            self.ae.add_supported_context(getattr(sop, name), syntaxes)
        self.ae.add_supported_context(sop.Verification)
        self._handlers = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store),
                          (evt.EVT_C_ECHO, lambda event: SUCCESS), (evt.EVT_RELEASED, self._ended),
                          (evt.EVT_ABORTED, self._ended), (evt.EVT_CONN_CLOSE, self._ended)]
        self._server: Any = None

    def start(self, host: str = "127.0.0.1", port: int = 11112) -> tuple[str, int]:
        """Listen (in background threads) on host:port (port 0: a free one); the address bound."""
        try:
            self._server = self.ae.start_server((host, port), block=False, evt_handlers=self._handlers,
                                                ssl_context=self.ssl_context)
        except OSError as e:
            raise ReceiverError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        bound = self._server.server_address
        return bound[0], bound[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # ------------------------------------------------------------ handlers (association threads)
    def _requested(self, event: Any) -> None:
        requestor = event.assoc.requestor  # its ae_title is set only once negotiation starts
        calling, address = str(requestor.primitive.calling_ae_title).strip(), str(requestor.address)
        if self.allowed is not None and not any(caller.admits(calling, address) for caller in self.allowed):
            log.warning("refused an association from %s at %s: not on the allow list", calling, address)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE title
            event.assoc.kill()  # as pynetdicom's own rejections: waits for the A-ASSOCIATE-RJ to leave
            return
        _prefer_proposed_syntaxes(event.assoc)

    def _ended(self, event: Any) -> None:
        self.ended()

    def _store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            data = event.encoded_dataset(include_meta=True)
            study, series, instance = self._uids(data)
            target = self.folder.path_for(study, series, instance)
        except UnsafeUIDError as e:
            log.warning("refused an instance from %s: %s", calling, one_line(e, 200))
            return UID_NOT_USABLE
        except Exception as e:  # whatever a malformed dataset makes pydicom raise
            log.warning("refused a malformed dataset from %s: %s", calling, one_line(e, 200))
            return CANNOT_UNDERSTAND
        try:
            self.folder.write(target, data)
        except OSError as e:
            if e.errno in OUT_OF_SPACE:
                log.error("cannot store an instance from %s: %s is full (the sender may retry)",
                          calling, self.folder.root)
                return OUT_OF_RESOURCES
            log.error("cannot store an instance from %s: %s", calling, e.strerror or e)
            return CANNOT_STORE if e.errno != errno.ENOMEM else OUT_OF_RESOURCES
        self.arrived(target)
        return SUCCESS

    def _uids(self, data: bytes) -> tuple[str, str, str]:
        """The Study, Series and SOP Instance UIDs of an encoded file (a deflated one inflated
        within the decoder's bounds)."""
        import pydicom

        from ..decode.bounds import inflate_deflated_dicom

        readable = inflate_deflated_dicom(data, self.max_megapixels)
        names = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        with warnings.catch_warnings():  # a malformed dataset makes one log line, not pydicom's warnings
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(readable), stop_before_pixels=True, specific_tags=list(names))
            found = tuple(str(ds.get(name) or "") for name in names)  # values are checked (and warned of) here
        missing = [name for name, value in zip(names, found) if not value]
        if missing:
            raise ValueError(f"the dataset lacks its {', '.join(missing)}")
        return found  # type: ignore[return-value]


def _prefer_proposed_syntaxes(assoc: Any) -> None:
    """Order this association's transfer syntaxes as the requestor proposed them, so that the
    syntax it lists first (the one its file is in) is the one accepted. pynetdicom accepts the
    first of the acceptor's list that the requestor proposed; the list is this association's
    own copy, so other associations are unaffected."""
    from pynetdicom.presentation import build_context

    preferred: dict[str, dict[str, int]] = {}
    for context in assoc.requestor.requested_contexts:
        order = preferred.setdefault(str(context.abstract_syntax), {})
        for syntax in context.transfer_syntax:
            order.setdefault(str(syntax), len(order))
    contexts = []
    for context in assoc.acceptor.supported_contexts:
        order = preferred.get(str(context.abstract_syntax))
        syntaxes = list(context.transfer_syntax)
        if order:
            syntaxes.sort(key=lambda syntax: order.get(str(syntax), len(order)))
        contexts.append(build_context(context.abstract_syntax, syntaxes))
    assoc.acceptor.supported_contexts = contexts
