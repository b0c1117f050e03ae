"""REST systems as tools: a ``connectors:`` entry's operations, each called as one HTTP request (``httpx2``).

The operations come from an OpenAPI document (``connectors.openapi``) or are declared in the config
(``connectors.operations``); each is a tool that behaves like an upstream MCP server's: listed, validated,
policed, metered and audited by the one dispatch path, which knows nothing of REST.

A call's arguments become one request to the connector's ``base_url`` and nowhere else: no argument can
change its scheme, host or port; path arguments are percent-encoded (a ``/`` in one cannot add a segment, and
``.``/``..`` cannot climb); a redirect is followed only within the same origin; and a request to a link-local or
cloud-metadata address is refused unless the connector allows it (:func:`forbidden_address`).

The answer: a 2xx JSON body is the result's text and, when it is an object, its ``structuredContent``; other
text comes back as text, a binary body as an embedded resource; a non-2xx status is an ``isError`` result
naming the status with a bounded excerpt of the body; a body over ``gateway.max_result`` is that call's error.
Secrets (auth, configured headers) never appear in results, errors or logs: a request is named by its method
and path template, never by its URL.
"""

import base64
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import anyio
import anyio.abc
import httpx2

from connectors.openapi import SpecError, check_spec, operations_of, parse_spec
from connectors.operations import Declared, Operation, declared
from gateway.config import DEFAULT_MAX_RESULT, ConnectorConfig
from gateway.errors import (
    ConfigProblem,
    InvalidArguments,
    ResultTooLarge,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.types import (
    CallContext,
    JSONObject,
    Listing,
    ProviderEvents,
    ProviderState,
    Tool,
    ToolResult,
)

__all__ = ["EXCERPT", "RestConnector", "Request", "build_request", "forbidden_address", "shaped"]

logger = logging.getLogger(__name__)

EXCERPT = 1000
"""Characters of a non-2xx response's body quoted in the call's error."""
MAX_REDIRECTS = 5
INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 30.0
TOKEN_SLACK = 30.0
"""Seconds before an OAuth token's expiry that it is fetched anew."""
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
"""Cloud metadata services (AWS, GCP, Azure: 169.254.169.254; AWS IPv6; Alibaba; ECS task metadata)."""
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript", "application/yaml")
_TEXT_SUFFIXES = ("+json", "+xml")


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request of an operation, before auth: ``url`` is below the connector's ``base_url``."""

    method: str
    url: str
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


def build_request(operation: Operation, arguments: JSONObject, base_url: str) -> Request:
    """The request ``arguments`` make of ``operation``. Pure.

    Raises:
        InvalidArguments: a path argument is missing, or a value cannot go in a header.
    """
    claimed: set[str] = set()
    path = operation.path
    query: list[tuple[str, str]] = []
    headers: list[tuple[str, str]] = []
    cookies: list[str] = []
    for parameter in operation.parameters:
        claimed.add(parameter.argument)
        value = arguments.get(parameter.argument)
        if parameter.location == "path":
            if value is None:
                raise InvalidArguments(f"{parameter.argument!r} is required: it fills the path {operation.path}")
            path = path.replace("{" + parameter.name + "}", _segment(value))
        elif value is None:
            continue
        elif parameter.location == "query":
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not parameter.explode:
                values = [",".join(_text(v) for v in value)]
            query.extend((parameter.name, _text(v)) for v in values)
        elif parameter.location == "header":
            headers.append((parameter.name, _header_value(parameter.argument, _text(value))))
        else:
            cookies.append(f"{parameter.name}={quote(_text(value), safe='')}")
    if cookies:
        headers.append(("Cookie", "; ".join(cookies)))
    body: bytes | None = None
    if operation.body is not None:
        body, media_type = _body(operation, arguments, claimed)
        if body is not None:
            headers.append(("Content-Type", media_type))
    return Request(operation.method, base_url + path, tuple(query), tuple(headers), body)


def _body(operation: Operation, arguments: JSONObject, claimed: set[str]) -> tuple[bytes | None, str]:
    spec = operation.body
    assert spec is not None
    media_type = spec.media_type
    if spec.argument is not None:
        value = arguments.get(spec.argument)
        if value is None:
            return None, media_type
        if _is_json(media_type):
            return _json_bytes(value), media_type
        if media_type == "application/x-www-form-urlencoded" and isinstance(value, Mapping):
            return urlencode({k: _text(v) for k, v in value.items()}).encode(), media_type
        return _text(value).encode(), media_type
    fields = {spec.properties.get(name, name): value for name, value in arguments.items() if name not in claimed}
    if not fields and not spec.required:
        return None, media_type
    if media_type == "application/x-www-form-urlencoded":
        return urlencode({k: _text(v) for k, v in fields.items()}, doseq=True).encode(), media_type
    return _json_bytes(fields), media_type if _is_json(media_type) else "application/json"


def _json_bytes(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False)
    _check_unicode(text)
    return text.encode()


def _segment(value: Any) -> str:
    """A path argument as one percent-encoded segment: ``/`` is encoded, and ``.``/``..`` cannot climb."""
    text = _text(value)
    if text in (".", ".."):
        return text.replace(".", "%2E")
    return quote(text, safe="")


def _text(value: Any) -> str:
    """An argument's value as text for a path, query, header or form (JSON for arrays and objects).

    Raises:
        InvalidArguments: it holds text that is not valid Unicode (a lone surrogate), which nothing can send.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    _check_unicode(text)
    return text


def _check_unicode(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidArguments("an argument holds text that is not valid Unicode (a lone surrogate)") from None


def _header_value(argument: str, value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise InvalidArguments(f"{argument!r} goes in a header, which cannot hold a line break or a NUL")
    if not value.isascii():
        raise InvalidArguments(f"{argument!r} goes in a header, which holds ASCII text only")
    return value


def _is_json(media_type: str) -> bool:
    base = media_type.split(";", 1)[0].strip().lower()
    return base == "application/json" or base.endswith("+json")


def _is_text(media_type: str) -> bool:
    base = media_type.split(";", 1)[0].strip().lower()
    return base.startswith(_TEXT_TYPES) or base.endswith(_TEXT_SUFFIXES) or base == "application/x-www-form-urlencoded"


def shaped(operation: Operation, status: int, reason: str, media_type: str, body: bytes, url: str) -> ToolResult:
    """The tool result of an operation's response (``url``: where it came from, without its query). Pure."""
    where = f"{operation.method} {operation.path}"
    if not 200 <= status < 300:
        text = body.decode("utf-8", errors="replace")
        excerpt = text[:EXCERPT] + (f" … ({len(text) - EXCERPT} more characters)" if len(text) > EXCERPT else "")
        said = f": {excerpt}" if excerpt.strip() else ""
        return ToolResult.text(f"HTTP {status} {reason} from {where}{said}", is_error=True)
    if not body:
        return ToolResult.text(f"HTTP {status} {reason} from {where}, with no body")
    if _is_json(media_type) or (not media_type and body[:1] in (b"{", b"[")):
        try:
            value = json.loads(body)
        except ValueError:
            return ToolResult.text(body.decode("utf-8", errors="replace"))
        text = json.dumps(value, ensure_ascii=False)
        structured = value if isinstance(value, dict) else None
        return ToolResult(content=({"type": "text", "text": text},), structured_content=structured)
    if _is_text(media_type) or not media_type:
        try:
            return ToolResult.text(body.decode("utf-8"))
        except UnicodeDecodeError:
            if _is_text(media_type):
                return ToolResult.text(body.decode("utf-8", errors="replace"))
    blob = base64.b64encode(body).decode()
    resource = {"uri": url, "mimeType": media_type or "application/octet-stream", "blob": blob}
    return ToolResult(content=({"type": "resource", "resource": resource},))


def forbidden_address(address: str) -> bool:
    """Whether an IP address is link-local or a cloud metadata service's (refused unless a connector allows them)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or ip in METADATA_ADDRESSES


class _Refused(Exception):
    """A request the connector will not send (its reason is safe to show)."""


class RestConnector:
    """One ``connectors:`` entry: a provider of tools (``gateway.types.Provider``) over REST."""

    def __init__(self, name: str, config: ConnectorConfig, *, max_result: int = DEFAULT_MAX_RESULT) -> None:
        self.name = name
        self.config = config
        self.max_result = max_result
        self.state = ProviderState.CONNECTING
        self.last_error: str | None = None
        self.listing = Listing()
        self.warnings: tuple[str, ...] = ()
        """Nothing is worked around: what is wrong in its document is in :attr:`problems`."""
        self.problems: tuple[ConfigProblem, ...] = ()
        """What is wrong in its OpenAPI document (each with its JSON pointer), for ``patchbay check`` and
        ``/readyz``; the operations a problem concerns are left out, the rest served."""
        self._operations: dict[str, Operation] = {}
        self._base_url = config.base_url
        self._http: httpx2.AsyncClient | None = None
        self._stop = anyio.CancelScope()
        self._token: tuple[str, float] | None = None
        """The OAuth access token and when to fetch a new one (``anyio.current_time()``)."""
        self._token_lock = anyio.Lock()
        self._secrets = tuple(_secrets_of(config))

    # -- lifetime -----------------------------------------------------------------------------

    async def run(
        self, events: ProviderEvents, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Load the operations, then keep the state current (the health path, when configured), until closed."""
        started = False
        backoff = INITIAL_BACKOFF
        timeout = httpx2.Timeout(self.config.timeout)
        try:
            with self._stop:
                async with httpx2.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as http:
                    self._http = http
                    while True:
                        before = (self.state, self.last_error, len(self.listing.tools))
                        await self._refresh()
                        if not started:
                            started = True
                            task_status.started()
                        elif (self.state, self.last_error, len(self.listing.tools)) != before:
                            await events.changed(self.name)
                        if self.state is ProviderState.UP and self.config.health is None:
                            await anyio.sleep_forever()
                        wait = self.config.health_interval if self.state is ProviderState.UP else backoff
                        backoff = INITIAL_BACKOFF if self.state is ProviderState.UP else min(backoff * 2, MAX_BACKOFF)
                        await anyio.sleep(wait)
        finally:
            self._http = None
            self.state = ProviderState.DOWN
            self.last_error = self.last_error or "closed"
            if not started:
                task_status.started()

    async def close(self) -> None:
        self._stop.cancel()

    async def _refresh(self) -> None:
        """One attempt to come (or stay) up: the operations loaded once, then the health path each time."""
        try:
            if not self._operations:
                await self._load()
            if self.config.health is not None:
                await self._check_health()
        except (_Refused, UpstreamError) as exc:  # UpstreamError: a document or health answer over max_result
            self._down(self._scrub(str(exc)))
            return
        except httpx2.HTTPError as exc:
            self._down(self._scrub(f"{type(exc).__name__}: {exc}"))
            return
        self.state, self.last_error = ProviderState.UP, None

    def _down(self, reason: str) -> None:
        if self.state is not ProviderState.DOWN or self.last_error != reason:
            logger.warning("connector %s: %s", self.name, reason)
        self.state, self.last_error = ProviderState.DOWN, reason

    async def _load(self) -> None:
        if self.config.operations is not None:
            where = f"connectors.{self.name}.operations"
            entries = [Declared(o.name, o.method, o.path, o.input, o.description) for o in self.config.operations]
            self._serve(declared(entries, where))
            return
        assert self.config.openapi is not None
        text = await self._read_document(self.config.openapi)
        try:
            spec = parse_spec(text)
        except SpecError as exc:
            self.problems = tuple(self._problem(p.pointer, p.message) for p in exc.problems)
            more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
            raise _Refused(f"the OpenAPI document cannot be used: {exc.problems[0].message}{more}") from None
        operations, left_out = operations_of(spec)
        # An operation left out for a problem the validator found too is said once, with what it costs.
        found = [p for p in check_spec(spec) if not any(o.pointer == p.pointer for o in left_out)] + left_out
        self.problems = tuple(self._problem(p.pointer, p.message) for p in found)
        if found:
            logger.warning(
                "connector %s: %d problem(s) in %s (%d operation(s) left out); `patchbay check` lists them",
                self.name,
                len(found),
                self.config.openapi,
                len(left_out),
            )
        if self._base_url is None:
            self._base_url = _server_url(spec)
        if self._base_url is None:
            raise _Refused("no base URL: set `base_url` (the document's `servers` give no absolute http(s) URL)")
        if not operations:
            first = f": {found[0].message}" if found else ""
            raise _Refused(f"the OpenAPI document yields no operation{first}")
        self._serve(operations)

    def _serve(self, operations: Iterable[Operation]) -> None:
        admitted = [op for op in operations if self._admits(op)]
        self._operations = {op.name: op for op in admitted}
        self.listing = Listing(tools=tuple(Tool(op.name, op.definition) for op in admitted))

    def _admits(self, operation: Operation) -> bool:
        """``tools.include``/``exclude``: globs of operation names, or of tags when written ``tag:<glob>``."""
        rules = self.config.tools

        def matches(pattern: str) -> bool:
            if pattern.startswith("tag:"):
                return any(fnmatchcase(tag, pattern[4:]) for tag in operation.tags)
            return fnmatchcase(operation.name, pattern)

        return any(map(matches, rules.include)) and not any(map(matches, rules.exclude))

    def _problem(self, pointer: str, message: str) -> ConfigProblem:
        return ConfigProblem(f"connectors.{self.name}.openapi", f"{self.config.openapi}#{pointer}: {message}")

    async def _read_document(self, where: str) -> str:
        if not where.startswith(("http://", "https://")):
            try:
                return await anyio.Path(where).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise _Refused(f"cannot read the OpenAPI document {where}: {reason}") from None
        status, _reason, _media_type, body, _url = await self._exchange("GET", where, (), ())
        if not 200 <= status < 300:
            raise _Refused(f"the OpenAPI document's URL answered HTTP {status}")
        return body.decode("utf-8", errors="replace")

    async def _check_health(self) -> None:
        assert self._base_url is not None
        assert self.config.health is not None
        # As a call is sent: the configured headers and every kind of auth (an API key in the query too).
        status, reason, *_ = await self._authorised(Request("GET", self._base_url + self.config.health))
        if not 200 <= status < 300:
            raise _Refused(f"the health check GET {self.config.health} answered HTTP {status} {reason}")

    # -- calls --------------------------------------------------------------------------------

    async def list_tools(self) -> Sequence[Tool]:
        return self.listing.tools

    async def request(self, method: str, params: JSONObject, context: CallContext) -> JSONObject:
        raise UpstreamError(f"connector {self.name!r} offers tools only, not {method}", server=self.name)

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """One HTTP request for operation ``name``.

        Raises:
            InvalidArguments: the arguments cannot make a request.
            UpstreamUnavailable: the connector is down, or the system could not be reached.
            UpstreamTimeout: no answer within the connector's ``timeout``.
            ResultTooLarge: the body is larger than ``gateway.max_result``.
        """
        operation = self._operations.get(name)
        if self.state is not ProviderState.UP or operation is None or self._base_url is None:
            why = self.last_error or "not started"
            raise UpstreamUnavailable(
                f"connector {self.name!r} is {self.state.value}: {why}", server=self.name, retry_after=INITIAL_BACKOFF
            )
        request = build_request(operation, arguments, self._base_url)
        where = f"{operation.method} {operation.path}"
        try:
            with anyio.fail_after(self.config.timeout):
                status, reason, media_type, body, url = await self._authorised(request)
        except TimeoutError:
            raise UpstreamTimeout(
                f"connector {self.name!r} did not answer {where} within {self.config.timeout:g}s", server=self.name
            ) from None
        except _Refused as exc:
            return ToolResult.text(f"{where} was not sent: {self._scrub(str(exc))}", is_error=True)
        except httpx2.ConnectError as exc:  # nothing was sent: safe to try again
            raise UpstreamUnavailable(
                f"connector {self.name!r} cannot reach its system: {self._scrub(str(exc)) or type(exc).__name__}",
                server=self.name,
                retry_after=INITIAL_BACKOFF,
            ) from None
        except httpx2.HTTPError as exc:
            raise UpstreamUnavailable(
                f"connector {self.name!r}: {where} failed: {type(exc).__name__}: {self._scrub(str(exc))}",
                server=self.name,
            ) from None
        return shaped(operation, status, reason, media_type, body, url)

    async def _authorised(self, request: Request) -> tuple[int, str, str, bytes, str]:
        """The request with the connector's headers and auth; with OAuth, once more with a new token after a 401."""
        for attempt in range(2):
            token = await self._bearer(renew=attempt > 0)
            query = request.query + self._auth_query()
            headers = (*self._static_headers(), *self._auth_headers(token), *request.headers)
            answer = await self._exchange(request.method, request.url, query, headers, request.body)
            if answer[0] != 401 or self.config.auth is None or self.config.auth.oauth2_client_credentials is None:
                return answer
        return answer

    async def _exchange(
        self,
        method: str,
        url: str,
        query: Sequence[tuple[str, str]],
        headers: Sequence[tuple[str, str]],
        body: bytes | None = None,
    ) -> tuple[int, str, str, bytes, str]:
        """Send one request, following redirects within its origin: (status, reason, media type, body, the URL it
        came from without its query).

        Raises:
            _Refused: a redirect to another origin, or a forbidden address.
            ResultTooLarge: the body is over ``max_result``.
            httpx2.HTTPError: the exchange failed.
        """
        assert self._http is not None, "the connector is not running"
        # Merged into the URL's own query (a health path or document URL may have one): httpx2's `params` replace it.
        target = httpx2.URL(url).copy_merge_params(list(query))
        request = self._http.build_request(method, target, headers=list(headers), content=body)
        origin = _origin(request.url)
        for _ in range(MAX_REDIRECTS + 1):
            await self._guard(request.url)
            response = await self._http.send(request, stream=True)
            try:
                if response.next_request is None:
                    content = await self._read(response)
                    media_type = response.headers.get("content-type", "")
                    shown = str(response.url.copy_with(query=None, fragment=None))
                    return response.status_code, response.reason_phrase, media_type, content, shown
            finally:
                await response.aclose()
            request = response.next_request
            if _origin(request.url) != origin:
                raise _Refused(f"the system redirected to another origin ({_origin(request.url)}), which is refused")
        raise _Refused(f"more than {MAX_REDIRECTS} redirects")

    async def _read(self, response: httpx2.Response) -> bytes:
        declared_size = response.headers.get("content-length", "")
        if declared_size.isdigit() and int(declared_size) > self.max_result:
            raise ResultTooLarge(server=self.name, limit=self.max_result, size=int(declared_size))
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.max_result:
                raise ResultTooLarge(server=self.name, limit=self.max_result)
        return bytes(body)

    async def _guard(self, url: httpx2.URL) -> None:
        """Refuse link-local and metadata addresses (unless allowed), by every address the host resolves to."""
        if self.config.allow_link_local:
            return
        host = url.host
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                found = await anyio.getaddrinfo(host, url.port or (443 if url.scheme == "https" else 80))
            except OSError as exc:
                raise httpx2.ConnectError(f"cannot resolve {host}: {exc}") from None
            addresses = [str(info[4][0]) for info in found]
        bad = [a for a in addresses if forbidden_address(a)]
        if bad:
            raise _Refused(
                f"{host} is a link-local or cloud metadata address ({bad[0]}); set allow_link_local to allow it"
            )

    # -- auth ---------------------------------------------------------------------------------

    def _static_headers(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.config.headers.items())

    def _auth_headers(self, token: str | None) -> tuple[tuple[str, str], ...]:
        auth = self.config.auth
        if token is not None:
            return (("Authorization", f"Bearer {token}"),)
        if auth is None:
            return ()
        if auth.basic is not None:
            pair = f"{auth.basic.username}:{auth.basic.password.get_secret_value()}".encode()
            return (("Authorization", f"Basic {base64.b64encode(pair).decode()}"),)
        if auth.api_key is not None and auth.api_key.header is not None:
            return ((auth.api_key.header, auth.api_key.value.get_secret_value()),)
        return ()

    def _auth_query(self) -> tuple[tuple[str, str], ...]:
        auth = self.config.auth
        if auth is not None and auth.api_key is not None and auth.api_key.query is not None:
            return ((auth.api_key.query, auth.api_key.value.get_secret_value()),)
        return ()

    async def _bearer(self, *, renew: bool = False) -> str | None:
        """The bearer token to send: the static one, or an OAuth access token (cached, fetched when due)."""
        auth = self.config.auth
        if auth is None:
            return None
        if auth.bearer is not None:
            return auth.bearer.get_secret_value()
        if auth.oauth2_client_credentials is None:
            return None
        async with self._token_lock:
            if renew or self._token is None or anyio.current_time() >= self._token[1]:
                self._token = await self._fetch_token()
            return self._token[0]

    async def _fetch_token(self) -> tuple[str, float]:
        oauth = self.config.auth.oauth2_client_credentials if self.config.auth else None
        assert oauth is not None
        form = {"grant_type": "client_credentials"}
        if oauth.scope:
            form["scope"] = oauth.scope
        pair = f"{quote(oauth.client_id, safe='')}:{quote(oauth.client_secret.get_secret_value(), safe='')}"
        headers = (
            ("Authorization", f"Basic {base64.b64encode(pair.encode()).decode()}"),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Accept", "application/json"),
        )
        status, _reason, _media_type, body, _url = await self._exchange(
            "POST", oauth.token_url, (), headers, urlencode(form).encode()
        )
        try:
            answer = json.loads(body) if 200 <= status < 300 else None
        except ValueError:
            answer = None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise _Refused(f"the OAuth token endpoint answered HTTP {status} without an access token")
        expires = answer.get("expires_in") if isinstance(answer, dict) else None
        lifetime = float(expires) if isinstance(expires, int | float) and not isinstance(expires, bool) else 3600.0
        return token, anyio.current_time() + max(lifetime - TOKEN_SLACK, lifetime / 2)

    def _scrub(self, text: str) -> str:
        """``text`` with every configured secret masked (defence in depth: no message is built from them)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _secrets_of(config: ConnectorConfig) -> Iterable[str]:
    yield from (value for value in config.headers.values() if len(value) >= 4)
    auth = config.auth
    if auth is None:
        return
    secrets = (auth.bearer, auth.basic.password if auth.basic else None, auth.api_key.value if auth.api_key else None)
    yield from (secret.get_secret_value() for secret in secrets if secret is not None)
    if auth.oauth2_client_credentials is not None:
        yield auth.oauth2_client_credentials.client_secret.get_secret_value()


def _origin(url: httpx2.URL) -> str:
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{url.scheme}://{url.host}:{port}"


def _server_url(spec: Mapping[str, Any]) -> str | None:
    """The document's first ``servers`` URL, when it is an absolute http(s) URL without variables."""
    servers = spec.get("servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], Mapping):
        return None
    url = servers[0].get("url")
    if not isinstance(url, str) or "{" in url or urlsplit(url).scheme not in ("http", "https"):
        return None
    return url.rstrip("/")
