"""TLS for every hop, from certificate files (`shared.config.TlsConfig`):

- public: the router's gRPC port and HTTPS serve `tls.cert_file`/`tls.key_file`; clients
  verify them against the CA they trust (`router.client` `ca_file=`, `specdec generate
  --ca-file`);
- internal (mutual TLS): verifier and drafter servers present `tls.internal_cert_file` and
  require a client certificate of the internal CA (`tls.internal_ca_file`); the router and
  verifiers present the same kind of certificate and accept only servers whose certificate
  the internal CA signed — a replica found through discovery that cannot show one is never
  talked to.

No files configured: plaintext, the embedded default on loopback. Certificates must name the
address peers dial (e.g. a SAN of 127.0.0.1 for `specdec serve`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from shared.config import TlsConfig


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def public_server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    if tls.cert_file is None:
        return None
    return grpc.ssl_server_credentials([(_read(tls.key_file), _read(tls.cert_file))])


def internal_server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    if tls.internal_ca_file is None:
        return None
    return grpc.ssl_server_credentials(
        [(_read(tls.internal_key_file), _read(tls.internal_cert_file))],
        root_certificates=_read(tls.internal_ca_file),
        require_client_auth=True,
    )


def internal_channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials | None:
    if tls.internal_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.internal_ca_file),
        private_key=_read(tls.internal_key_file),
        certificate_chain=_read(tls.internal_cert_file),
    )


def add_port(server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `address` with TLS when credentials are given (0 = the bind failed)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def aio_channel(address: str, credentials: grpc.ChannelCredentials | None, options=()) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


def channel(address: str, credentials: grpc.ChannelCredentials | None, options=()) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
