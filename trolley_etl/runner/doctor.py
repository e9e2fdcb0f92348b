"""`trolley-etl doctor`: each backend of a manifest checked the way an archive administrator
would, step by step, so the first failing step names the fix.

For every backend: the host resolves, the port answers, the TLS certificate is valid (for
https and DICOM TLS), and the clock agrees with the server's (HTTP `Date`). Then what the
backend is for: a C-ECHO, a minimal search (the manifest's first query, one result), and
for the downloader one instance of the study that search found, fetched and thrown away
(WADO-RS answers, C-GET storage roles are negotiated, the archive knows the C-MOVE
destination and reaches our port). Checks run in order and later ones are skipped when an
earlier one failed on the same backend.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from trolley_etl.core.backend import Downloader, Searcher
from trolley_etl.core.errors import (
    AssociationRejectedError,
    AuthenticationError,
    BackendError,
    TrolleyError,
)
from trolley_etl.core.model import InstanceReference, QueryLevel, SeriesReference
from trolley_etl.core.query import Query
from trolley_etl.manifest import Manifest
from trolley_etl.manifest.models import DimseBackend, HttpBackend

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
#: Clock differences (seconds) worth a warning, and a failure (tokens, TLS, logs disagree).
SKEW_WARN = 30.0
SKEW_FAIL = 300.0
#: Days before a certificate expires that earn a warning.
CERT_EXPIRY_WARN_DAYS = 14


@dataclass
class Check:
    role: str  # "search" or "download"
    name: str
    status: str  # ok, warn, FAIL, skip
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.role:<8}  {self.name:<11}  {self.detail}"
        return f"{text} -> fix: {self.hint}" if self.hint and self.status in (FAIL, WARN) else text


class _Discard:
    """A sink that counts what arrives and keeps nothing."""

    def __init__(self) -> None:
        self.instances = 0
        self.bytes = 0

    def open_instance(self) -> _Discard:
        return self

    def write(self, chunk: bytes) -> None:
        self.bytes += len(chunk)

    def commit(self) -> None:
        self.instances += 1

    def abort(self) -> None:
        pass


def endpoint(config: Any) -> tuple[str, int, bool]:
    """(host, port, uses TLS) of a backend's configuration."""
    if isinstance(config, HttpBackend):
        parts = urlsplit(config.url)
        https = parts.scheme == "https"
        return parts.hostname or "", parts.port or (443 if https else 80), https
    return config.host, config.port, getattr(config, "tls", None) is not None


def tls_context(config: Any) -> ssl.SSLContext | None:
    """The client TLS context a backend uses (None: TLS verification switched off)."""
    tls = getattr(config, "tls", None)
    verify = getattr(config, "verify_tls", True)
    if verify is False:
        return None
    files = {name: tls.path(name) if tls else None for name in ("ca_file", "cert_file", "key_file")}
    context = ssl.create_default_context()
    ca_file = files["ca_file"] or (verify if isinstance(verify, str) else None)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if files["cert_file"]:
        context.load_cert_chain(files["cert_file"], files["key_file"])
    return context


class Doctor:
    """Runs the checks of one manifest; `checks()` yields them as they finish."""

    def __init__(self, manifest: Manifest, searcher: Searcher, downloader: Downloader) -> None:
        self.manifest = manifest
        self.searcher = searcher
        self.downloader = downloader
        self.study_uid: str | None = None
        self._checked: dict[tuple[str, int], bool] = {}  # endpoint -> reachable

    def checks(self) -> Iterator[Check]:
        source = self.manifest.source
        search, download = source.search, source.effective_download
        if isinstance(search, (HttpBackend, DimseBackend)):
            yield from self._backend("search", search)
        if download.backend != "local" and isinstance(download, (HttpBackend, DimseBackend)):
            yield from self._backend("download", download)

    def _backend(self, role: str, config: Any) -> Iterator[Check]:
        host, port, uses_tls = endpoint(config)
        reachable = self._checked.get((host, port))
        if reachable is None:
            reachable = True
            for check in self._network(role, config, host, port, uses_tls):
                reachable = reachable and check.status != FAIL
                yield check
            self._checked[(host, port)] = reachable
        if not reachable:
            yield Check(role, config.backend, SKIP, "skipped: the archive cannot be reached")
            return
        if isinstance(config, DimseBackend):
            check = self._echo(role, config)
            yield check
            if check.status == FAIL:
                return
        yield from self._search(config) if role == "search" else self._download(config)

    # --- network ---------------------------------------------------------------------------

    def _network(
        self, role: str, config: Any, host: str, port: int, uses_tls: bool
    ) -> Iterator[Check]:
        timeout = min(10.0, float(getattr(config, "connection_timeout", 10.0)))
        try:
            addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port)})
        except OSError as exc:
            yield Check(
                role,
                "address",
                FAIL,
                f"{host} does not resolve ({exc.strerror})",
                "check the host name, or this machine's DNS",
            )
            return
        yield Check(role, "address", OK, f"{host} resolves to {', '.join(addresses)}")
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            yield Check(
                role,
                "port",
                FAIL,
                f"{host}:{port} does not answer ({reason})",
                "check the port; ask the archive's administrators whether a firewall "
                "blocks this machine",
            )
            return
        yield Check(role, "port", OK, f"{host}:{port} answers")
        if uses_tls:
            yield self._tls(role, config, host, port, timeout)
        if isinstance(config, HttpBackend):
            yield self._clock(role, config)

    def _tls(self, role: str, config: Any, host: str, port: int, timeout: float) -> Check:
        try:
            context = tls_context(config)
        except (OSError, ssl.SSLError) as exc:
            return Check(
                role,
                "tls",
                FAIL,
                f"cannot load the TLS files: {exc}",
                "check tls.ca_file, tls.cert_file and tls.key_file",
            )
        if context is None:
            return Check(
                role,
                "tls",
                WARN,
                "certificate not verified (verify_tls: false)",
                "give tls.ca_file instead of switching verification off",
            )
        try:
            with (
                socket.create_connection((host, port), timeout=timeout) as raw,
                context.wrap_socket(raw, server_hostname=host) as wrapped,
            ):
                cert = wrapped.getpeercert() or {}
        except ssl.SSLCertVerificationError as exc:
            return Check(
                role,
                "tls",
                FAIL,
                f"certificate of {host} not accepted: {exc.verify_message or exc.reason}",
                "set tls.ca_file to the CA that signed the archive's certificate, and "
                "use the host name the certificate names",
            )
        except (OSError, ssl.SSLError) as exc:
            return Check(
                role,
                "tls",
                FAIL,
                f"TLS handshake with {host}:{port} failed: {exc}",
                "check that the port speaks TLS, and the client certificate "
                "(tls.cert_file, tls.key_file) if the archive asks for one",
            )
        expires = cert.get("notAfter")
        if isinstance(expires, str):
            left = ssl.cert_time_to_seconds(expires) - dt.datetime.now(dt.timezone.utc).timestamp()
            if left < CERT_EXPIRY_WARN_DAYS * 86400:
                return Check(
                    role,
                    "tls",
                    WARN,
                    f"certificate valid, but expires {expires}",
                    "ask the archive's administrators to renew it",
                )
            return Check(role, "tls", OK, f"certificate valid until {expires}")
        return Check(role, "tls", OK, "certificate valid")

    def _clock(self, role: str, config: HttpBackend) -> Check:
        backend = self.searcher if role == "search" else self.downloader
        http = getattr(backend, "http", None)
        if http is None:
            return Check(role, "clock", SKIP, "no HTTP client to ask")
        try:
            response = http.session.get(
                http.base_url, timeout=http.timeout, verify=http.session.verify
            )
            response.close()
        except Exception as exc:
            return Check(role, "clock", SKIP, f"no answer to compare clocks with ({exc})")
        date = response.headers.get("Date")
        if not date:
            return Check(role, "clock", SKIP, "the server sends no Date header")
        server = email.utils.parsedate_to_datetime(date)
        skew = (dt.datetime.now(dt.timezone.utc) - server).total_seconds()
        detail = (
            f"this machine is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the server"
        )
        hint = "synchronise the clock (NTP): tokens, certificates and logs depend on it"
        if abs(skew) >= SKEW_FAIL:
            return Check(role, "clock", FAIL, detail, hint)
        if abs(skew) >= SKEW_WARN:
            return Check(role, "clock", WARN, detail, hint)
        return Check(role, "clock", OK, detail)

    # --- DICOM -----------------------------------------------------------------------------

    def _echo(self, role: str, config: DimseBackend) -> Check:
        from trolley_etl.backends.dimse import VERIFICATION, association

        backend: Any = self.searcher if role == "search" else self.downloader
        settings = backend.settings
        ae = settings.make_ae()
        ae.add_requested_context(VERIFICATION)
        try:
            with association(settings, ae, what="C-ECHO") as assoc:
                status = assoc.send_c_echo()
        except AssociationRejectedError as exc:
            return Check(
                role,
                "c-echo",
                FAIL,
                str(exc),
                f"the archive must list calling AE {config.calling_aet!r} (with this "
                f"machine's address) and be called {config.called_aet!r}",
            )
        except BackendError as exc:
            return Check(role, "c-echo", FAIL, str(exc), "check host, port and TLS settings")
        code = int(status.Status) if "Status" in status else None
        if code != 0:
            return Check(
                role,
                "c-echo",
                FAIL,
                f"C-ECHO answered status {code}",
                "ask the archive's administrators to allow C-ECHO",
            )
        return Check(role, "c-echo", OK, f"{settings.describe()}: C-ECHO succeeded")

    # --- search and download ---------------------------------------------------------------

    def _first_query(self) -> Query:
        from trolley_etl.runner.resolve import queries_of

        query = next(queries_of(self.manifest.queries[0]))
        return query.model_copy(update={"limit": 1, "offset": 0})

    def _search(self, config: Any) -> Iterator[Check]:
        query = self._first_query()
        shown = ", ".join(f"{k}={v}" for k, v in query.filters.items())
        try:
            studies = self.searcher.search(query)
        except AuthenticationError as exc:
            yield Check("search", "credentials", FAIL, str(exc), _auth_hint(config))
            return
        except TrolleyError as exc:
            yield Check(
                "search",
                "search",
                FAIL,
                f"the first query ({shown}) failed: {exc}",
                "see the message; check the filters of the first query set",
            )
            return
        auth_type = getattr(getattr(config, "auth", None), "type", "none")
        if auth_type != "none":
            yield Check("search", "credentials", OK, f"{auth_type} credentials accepted")
        if studies:
            self.study_uid = studies[0].uid
            yield Check("search", "search", OK, f"the first query ({shown}) found a study")
        else:
            yield Check(
                "search",
                "search",
                WARN,
                f"the first query ({shown}) found no study",
                "check the filters; the download cannot be tried",
            )

    def _download(self, config: Any) -> Iterator[Check]:
        if config.backend == "c-get":
            yield self._get_roles()
        if self.study_uid is None:
            yield Check("download", config.backend, SKIP, "no study to try (the search found none)")
            return
        try:
            reference = self._one_instance(self.study_uid)
            sink = _Discard()
            self.downloader.fetch(reference, sink)
        except AuthenticationError as exc:
            yield Check("download", "credentials", FAIL, str(exc), _auth_hint(config))
            return
        except TrolleyError as exc:
            yield Check(
                "download",
                config.backend,
                FAIL,
                f"fetching one object failed: {exc}",
                _download_hint(config),
            )
            return
        yield Check(
            "download",
            config.backend,
            OK,
            f"{config.backend} delivered {sink.instances} instance(s), {sink.bytes} bytes, "
            f"of study {self.study_uid}",
        )

    def _one_instance(self, study_uid: str) -> InstanceReference | SeriesReference:
        """One instance of the study (one series for downloaders that fetch series)."""
        series_query = Query(query_level=QueryLevel.SERIES, StudyInstanceUID=study_uid, limit=1)
        series = [s for study in self.searcher.search(series_query) for s in study.all_series()]
        if not series:
            raise BackendError(f"the archive lists no series of study {study_uid}")
        reference = SeriesReference(study_uid, series[0].uid)
        if self.downloader.retrieval_level is QueryLevel.SERIES:
            return reference
        instance_query = Query(
            query_level=QueryLevel.INSTANCE,
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series[0].uid,
            limit=1,
        )
        found = [i for study in self.searcher.search(instance_query) for i in study.all_instances()]
        if not found:
            raise BackendError(f"the archive lists no instances of series {series[0].uid}")
        return InstanceReference(study_uid, series[0].uid, found[0].uid)

    def _get_roles(self) -> Check:
        """Which common image classes the archive lets us receive over C-GET (SCP role)."""
        from pynetdicom.sop_class import uid_to_sop_class

        from trolley_etl.backends.dimse import COMMON_IMAGE_CLASSES, STUDY_ROOT_GET, association

        downloader: Any = self.downloader
        settings = downloader.settings
        ae = settings.make_ae()
        ae.add_requested_context(STUDY_ROOT_GET)
        for context in downloader.contexts:
            ae.add_requested_context(str(context.abstract_syntax), context.transfer_syntax)
        try:
            with association(settings, ae, ext_neg=list(downloader.roles), what="C-GET") as assoc:
                accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts if cx.as_scp}
        except TrolleyError as exc:
            return Check(
                "download",
                "c-get roles",
                FAIL,
                str(exc),
                "ask the archive's administrators to allow C-GET",
            )
        missing = [c for c in COMMON_IMAGE_CLASSES if c not in accepted]
        total = len(COMMON_IMAGE_CLASSES)
        if len(missing) == total:
            return Check(
                "download",
                "c-get roles",
                FAIL,
                "the archive accepted no storage class for C-GET (SCP role refused)",
                "use c-move, or ask for SCP/SCU role selection to be allowed",
            )
        if missing:
            names = ", ".join(str(uid_to_sop_class(c).name) for c in missing[:4])
            return Check(
                "download",
                "c-get roles",
                WARN,
                f"storage roles negotiated for {total - len(missing)} of {total} common "
                f"classes (not: {names})",
                "objects of those classes cannot arrive by C-GET; use c-move",
            )
        return Check(
            "download",
            "c-get roles",
            OK,
            f"storage roles negotiated for all {total} common image classes",
        )


def _auth_hint(config: Any) -> str:
    auth: Any = getattr(config, "auth", None)
    if getattr(auth, "type", "") == "command":
        return f"check that {auth.command[0]!r} prints a token this archive accepts"
    names = [
        str(getattr(auth, key))
        for key in (
            "username_env",
            "password_env",
            "token_env",
            "client_id_env",
            "client_secret_env",
        )
        if getattr(auth, key, None)
    ]
    if names:
        return f"check the credentials in {', '.join(names)}, and that this account may search"
    return "the archive asks for credentials: add auth to the backend"


def _download_hint(config: Any) -> str:
    if config.backend == "c-move":
        dest = config.move_destination
        return (
            f"the archive must know AE {dest.aet!r} with this machine's address and port "
            f"{dest.port}, and reach that port (firewall)"
        )
    if config.backend == "c-get":
        return "check that the archive allows C-GET for this calling AE"
    return "check the download url and that the account may retrieve"


def exit_status(checks: list[Check]) -> bool:
    """True when nothing failed."""
    return all(check.status != FAIL for check in checks)
