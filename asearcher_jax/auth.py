"""The one rule for every server of the project: loopback is open, anything else needs a token;
and how a server names and binds its address (IPv6 literals included).

Clients send `Authorization: Bearer <token>` (gRPC metadata `authorization`, checked by
`grpc_auth_interceptor` before the request is read).
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from asearcher_jax.errors import ConfigError


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def host_port(host: str, port: int) -> str:
  """`host:port`, an IPv6 literal in brackets (`[::1]:port`), as gRPC targets and URLs want."""
  return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def bind_grpc(server, host: str, port: int) -> int:
  """Binds a gRPC server's insecure port and returns it; an OSError naming the address when it
  cannot (grpc returns 0 or raises RuntimeError, by version)."""
  try:
    bound = server.add_insecure_port(host_port(host, port))
  except RuntimeError:
    bound = 0
  if bound == 0:
    raise OSError(f"cannot bind gRPC to {host_port(host, port)}")
  return bound


def require_token(host: str, token: str | None, what: str = "a token") -> None:
  """Raises ValueError when `host` is not loopback and no token is set."""
  if not is_loopback(host) and not token:
    raise ValueError(f"binding {host} (not loopback) requires {what}")


def server_token(host: str, token: str | None, how: str) -> str | None:
  """A gRPC server's token: `token`, else $ASEARCHER_TOKEN; a ConfigError naming `how` to set
  one when `host` is not loopback and there is none."""
  token = token or os.environ.get("ASEARCHER_TOKEN") or None
  try:
    require_token(host, token, f"a token: {how}")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return token


def bearer_ok(header: str | None, token: str | None) -> bool:
  """Whether an Authorization header carries `token` (always true when no token is set; an
  empty token, e.g. from an unset-but-exported env var, counts as none). Never raises: a
  header that is not valid UTF-8 (aiohttp hands such bytes over as surrogate escapes) is
  compared as raw bytes and simply fails to match."""
  if not token:
    return True
  want = f"Bearer {token}".encode("utf-8", errors="surrogateescape")
  got = (header or "").encode("utf-8", errors="surrogateescape") \
      if isinstance(header, str) else b""
  return hmac.compare_digest(got, want)


def grpc_auth_interceptor(token: str | None, open_methods: tuple[str, ...] = ()):
  """A grpc.aio server interceptor that refuses a call without `token` (`bearer_ok`) from its
  metadata alone: gRPC has read none of the request then, so a wrong token costs the server no
  message (up to its max_receive_message_length). `open_methods` ("/package.Service/Method")
  are served to anyone."""
  import grpc  # here: servers of HTTP alone import this module too

  async def refuse(requests, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

  # A handler that takes a request stream, unary methods' and streaming ones' alike: gRPC reads
  # a streaming request only as the handler asks for it, and this one never does.
  refused = grpc.stream_stream_rpc_method_handler(refuse)

  class BearerInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
      if details.method in open_methods or bearer_ok(
          dict(details.invocation_metadata or ()).get("authorization"), token):
        return await continuation(details)
      return refused

  return BearerInterceptor()
