"""The one policy for every URL the backend connects to (images, Label Studio's API).

The check runs on the parsed pieces that the HTTP client is then given (scheme, host, port,
path), never on a string the client parses again by other rules: a URL such as
``http://localhost:9301\\@127.0.0.1:9/x`` reads as host 127.0.0.1 to ``urllib.parse`` and as
localhost:9301 to other parsers, so such a string is refused instead of interpreted.

Refused: anything but ``http``/``https``; userinfo (``user:pass@``); backslashes and control
characters anywhere, whitespace in the scheme or host; an empty or malformed host or port.
A space or non-ASCII character in the path is %-encoded (Label Studio keeps upload names as
they are). Hosts are normalised
(lowercase, IDNA for non-ASCII names, no trailing dot, canonical IP addresses) before they
are compared with the allow-list or with Label Studio's host.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote

MAX_URL_LENGTH = 8192
_SCHEME_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
# characters kept as they are in a path and query; anything else (non-ASCII...) is %-encoded
_PATH_SAFE = "/?&=;:@!$'()*+,~-._%[]"


class UnsafeURL(ValueError):
    """The URL is malformed or breaks the outbound policy; the message says why."""


@dataclass(frozen=True)
class Target:
    """A URL broken into exactly what the HTTP client connects to and asks for."""

    scheme: str  # http | https
    host: str  # normalised: lowercase ASCII name, or a canonical IP address (IPv6 without brackets)
    port: int
    path: str  # path and query, starting with "/", ASCII only

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = _SCHEME_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{host}" + ("" if default else f":{self.port}")

    @property
    def url(self) -> str:
        return self.origin + self.path

    def same_origin(self, other: Target) -> bool:
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port)


def normalize_host(host: str) -> str:
    """Lowercase, IDNA-encoded, without a trailing dot; IP addresses in canonical form."""
    if not isinstance(host, str):
        raise UnsafeURL("The host is not a string.")
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.lower().removesuffix(".")
    if not text:
        raise UnsafeURL("The URL has no host.")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if ":" in text or "%" in text:
        raise UnsafeURL(f"Malformed host {shorten(host)}.")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError as error:
            raise UnsafeURL(f"The host {shorten(host)} is not a valid international domain name.") from error
    if len(text) > 253 or not _HOST_NAME.fullmatch(text):
        raise UnsafeURL(f"Malformed host {shorten(host)}.")
    return text


def parse_target(url: str) -> Target:
    """Check `url` against the policy and break it into a `Target`; raises UnsafeURL."""
    if not isinstance(url, str):
        raise UnsafeURL("The URL is not a string.")
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"The URL is longer than {MAX_URL_LENGTH} characters.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise UnsafeURL(f"The URL {shorten(url)} contains control characters (tab, CR, LF...).")
    if "\\" in url:
        raise UnsafeURL(f"The URL {shorten(url)} contains a backslash.")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in _SCHEME_PORTS:
        raise UnsafeURL(f"The URL {shorten(url)} is not http:// or https://.")
    authority, path = _split_authority(rest)
    if any(ch.isspace() for ch in scheme + authority):
        raise UnsafeURL(f"The URL {shorten(url)} has whitespace in its scheme or host.")
    if "@" in authority:
        raise UnsafeURL(f"The URL {shorten(url)} carries credentials (user@host); they are not allowed.")
    host, port = _split_host_port(authority, _SCHEME_PORTS[scheme], url)
    return Target(scheme, normalize_host(host), port, _clean_path(path))


def _split_authority(rest: str) -> tuple[str, str]:
    """``host:port/path?query#fragment`` -> (``host:port``, ``/path?query``); the fragment is dropped."""
    end = len(rest)
    for mark in "/?#":
        index = rest.find(mark)
        if index != -1:
            end = min(end, index)
    authority, path = rest[:end], rest[end:]
    path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    return authority, path


def _split_host_port(authority: str, default_port: int, url: str) -> tuple[str, int]:
    if authority.startswith("["):  # [IPv6]:port
        close = authority.find("]")
        if close == -1:
            raise UnsafeURL(f"Malformed IPv6 host in {shorten(url)}.")
        host, after = authority[: close + 1], authority[close + 1 :]
        if after and not after.startswith(":"):
            raise UnsafeURL(f"Malformed host in {shorten(url)}.")
        port_text = after[1:] if after else ""
    else:
        host, _, port_text = authority.partition(":")
        if ":" in port_text:
            raise UnsafeURL(f"Malformed host in {shorten(url)}.")
    if not port_text:
        if authority.endswith(":"):
            raise UnsafeURL(f"Empty port in {shorten(url)}.")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise UnsafeURL(f"Malformed port in {shorten(url)}.")
    return host, int(port_text)


def _clean_path(path: str) -> str:
    # HTTP wants ASCII on the request line; %-encode the rest (existing %xx escapes stay as they are)
    return quote(path, safe=_PATH_SAFE)


def host_allowed(target: Target, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether `target`'s host is in the allow-list (entries normalised the same way; ``*`` is any)."""
    if "*" in allowed_hosts:
        return True
    for entry in allowed_hosts:
        try:
            if normalize_host(entry) == target.host:
                return True
        except UnsafeURL:
            continue  # a malformed entry matches nothing
    return False


def shorten(value, limit: int = 120) -> str:
    """``repr(value)``, cut to `limit` characters: input is echoed into messages, never in full."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    if isinstance(value, str):
        text = repr(text[: limit + 1])
    if len(text) <= limit:
        return text
    return f"{text[: limit - 3]}... ({len(value) if isinstance(value, (str, bytes)) else len(text)} characters)"
