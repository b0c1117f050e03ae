"""Redaction: a copy of a value with its secrets replaced by ``[REDACTED]``, for the audit trail.

Audit records keep the arguments and results of every call, and those carry
passwords, API keys and bearer tokens. Two rules remove them:

* **Keys.** In a mapping, a key containing a configured key – case-insensitive,
  ignoring ``-`` and ``_`` – has its whole value replaced, whatever its type:
  with ``token`` configured, ``refresh_token``, ``X-Token`` and ``tokenValue``
  all match (so does ``max_tokens``: the rule errs on the side of hiding).
* **Patterns.** In every string anywhere (values, list items, nested), each
  substring matching a configured regular expression is replaced. When a
  pattern has a group named ``secret``, only that group is replaced, so the
  record keeps its context (``Bearer [REDACTED]``).

Built-in patterns (on unless ``builtins=False``), chosen to be specific enough
that ordinary text is left alone:

* ``Bearer <token>`` (RFC 6750 credentials, in headers or free text);
* JSON Web Tokens (three base64url parts, the first two starting ``eyJ``);
* the password of a URL (``postgresql://user:[REDACTED]@host``);
* ``key=value`` and ``key: value`` text for the configured keys (query strings,
  environment dumps, JSON or Python reprs held in a string), where the value is
  a quoted string, an auth scheme and its credentials, or one word;
* well-known credential shapes, whatever surrounds them: OpenAI and Anthropic
  keys (``sk-…``, ``sk-proj-…``, ``sk-ant-…``; with a digit, 20 characters or
  more after ``sk-``), Stripe keys (``sk_live_…``, ``rk_test_…``), GitHub
  tokens (``ghp_``, ``gho_``, ``ghu_``, ``ghs_``, ``ghr_``, ``github_pat_``),
  Slack tokens (``xoxb-…`` and the other ``xox?-``), AWS access key ids
  (``AKIA…``, ``ASIA…``), Google API keys (``AIza…``) and PEM private key
  blocks (``-----BEGIN … PRIVATE KEY-----`` to its end line).

Values that are not JSON come out as JSON anyway (the record must serialize):
tuples and sets become lists, bytes a length marker, other objects their
``str()`` (redacted). Nesting deeper than ``MAX_DEPTH`` and reference cycles
are replaced whole: a subtree that cannot be inspected is not written.
"""

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["DEFAULT_KEYS", "DEFAULT_PATTERNS", "MAX_DEPTH", "REDACTED", "Redactor"]

DEFAULT_KEYS = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "api_key",
    "apikey",
    "cookie",
    "private_key",
    "credential",
)
"""Keys whose values are always secret (matched as substrings, ignoring case, ``-`` and ``_``)."""

_CREDENTIALS = "|".join(  # the shapes of well-known credentials, as one expression: one scan finds them all
    (
        r"\bsk-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9][A-Za-z0-9_-]{19,}",  # OpenAI sk-…/sk-proj-…, Anthropic sk-ant-…
        r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe secret and restricted keys
        r"\bgh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens: personal, OAuth, user-to-server, server, refresh
        r"\bgithub_pat_[A-Za-z0-9_]{22,}",  # GitHub fine-grained personal access tokens
        r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack tokens
        r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",  # AWS access key ids
        r"\bAIza[A-Za-z0-9_-]{35}",  # Google API keys
        # PEM private keys (RSA, EC, OPENSSH, ENCRYPTED…), to the end of the text when it was cut before the end line
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[\s\S]*)",
    )
)
_BUILTINS = (  # (a lowercase literal every match contains, the pattern)
    ("bearer", r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9\-._~+/]+=*)"),
    ("eyj", r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
    ("://", r"://[^\s/:@]+:(?P<secret>[^\s/@]+)@"),
)
DEFAULT_PATTERNS = (*(pattern for _, pattern in _BUILTINS), _CREDENTIALS)
"""Built-in patterns: bearer credentials, JSON Web Tokens, passwords in URLs, well-known credential shapes."""

_CREDENTIALS_PATTERN = re.compile(_CREDENTIALS)

REDACTED = "[REDACTED]"
TOO_DEEP = "[REDACTED: nested too deep]"
CYCLE = "[REDACTED: reference cycle]"

MAX_DEPTH = 64
"""Containers nested deeper than this are replaced whole (bounded recursion, bounded work)."""

_KEY_CACHE_SIZE = 4096
_AUTH_SCHEMES = "basic|bearer|digest|negotiate|ntlm|token"
_Substitute = Callable[[str], str]


class Redactor:
    """Makes redacted copies of arguments, results and text; built once, used on every call."""

    def __init__(
        self, keys: Iterable[str] = DEFAULT_KEYS, patterns: Iterable[str] = (), *, builtins: bool = True
    ) -> None:
        """Compile the rules once.

        Raises:
            ValueError: a pattern is not a valid regular expression or matches the empty string
                (the message names it), or a key is empty (it would match every key).
        """
        normalized = []
        for key in keys:
            if not _normalize(key):
                raise ValueError(f"redaction key {key!r} is empty once '-' and '_' are ignored")
            normalized.append(_normalize(key))
        self._keys = tuple(dict.fromkeys(normalized))
        self._key_cache: dict[str, bool] = {}
        self._builtins = (
            tuple((hint, _substitution(_compile(source))) for hint, source in _BUILTINS) if builtins else ()
        )
        self._credentials = _substitution(_CREDENTIALS_PATTERN)
        self._assignment = _substitution(_compile(_assignment_pattern(self._keys))) if builtins and self._keys else None
        self._subs = tuple(_substitution(_compile(source, user=True)) for source in patterns)

    def redact(self, value: Any) -> Any:
        """A redacted, JSON-compatible copy of ``value``; ``value`` itself is never changed."""
        return self._walk(value, 0, set())

    def redact_text(self, text: str) -> str:
        """``text`` with every substring matching a pattern replaced."""
        if self._builtins:
            # Each built-in runs only when the text holds its literal hint: most strings hold none, and
            # ``in`` over the lowered text costs far less than a regular expression scanning it.
            lowered = text.lower()
            for hint, sub in self._builtins:
                if hint in lowered:
                    text = sub(text)
            if _may_hold_credential(text):
                text = self._credentials(text)
            if self._assignment is not None and ("=" in text or ":" in text):
                flat = lowered.replace("-", "").replace("_", "")
                if any(key in flat for key in self._keys):
                    text = self._assignment(text)
        for sub in self._subs:
            text = sub(text)
        return text

    def is_secret_key(self, key: str) -> bool:
        """Whether a mapping key's value is redacted whole."""
        known = self._key_cache.get(key)
        if known is None:
            normalized = _normalize(key)
            known = any(k in normalized for k in self._keys)
            if len(self._key_cache) >= _KEY_CACHE_SIZE:  # keys come from callers: keep the cache bounded
                self._key_cache.clear()
            self._key_cache[key] = known
        return known

    def _walk(self, value: Any, depth: int, path: set[int]) -> Any:
        # Recursion bounded by MAX_DEPTH; ``path`` holds the ids of the containers being walked, to stop cycles.
        kind = type(value)  # exact types first: JSON from the wire is only these, and isinstance on ABCs is slow
        if kind is str:
            return self.redact_text(value) if value else value
        if kind is int or kind is bool or value is None:
            return value
        if (kind is dict or kind is list) and depth < MAX_DEPTH and id(value) not in path:
            path.add(id(value))
            try:
                if kind is list:
                    return [self._walk(item, depth + 1, path) for item in value]
                return self._mapping(value, depth, path)
            finally:
                path.discard(id(value))
        return self._walk_other(value, depth, path)

    def _walk_other(self, value: Any, depth: int, path: set[int]) -> Any:
        """``_walk`` for what is not plain JSON from the wire: subclasses, tuples, sets, floats, objects."""
        if isinstance(value, str):
            return self.redact_text(value)
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return f"[{len(value)} bytes]"
        if not isinstance(value, Mapping | list | tuple | set | frozenset):
            return self.redact_text(str(value))
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        ident = id(value)
        if ident in path:
            return CYCLE
        path.add(ident)
        try:
            if isinstance(value, Mapping):
                return self._mapping(value, depth, path)
            return [self._walk(item, depth + 1, path) for item in value]
        finally:
            path.discard(ident)

    def _mapping(self, value: Mapping[Any, Any], depth: int, path: set[int]) -> dict[str, Any]:
        copy: dict[str, Any] = {}
        secret, text, walk = self.is_secret_key, self.redact_text, self._walk
        for k, v in value.items():
            key = k if type(k) is str else str(k)
            if secret(key):
                copy[key] = REDACTED
            elif type(v) is str:  # the common leaves inline: a call per value is most of the walk's cost
                copy[key] = text(v) if v else v
            elif type(v) is int or v is None or type(v) is bool or (type(v) is float and math.isfinite(v)):
                copy[key] = v
            else:
                copy[key] = walk(v, depth + 1, path)
        return copy


def _may_hold_credential(text: str) -> bool:
    """Whether ``text`` holds a literal that every match of ``_CREDENTIALS`` holds: a few ``in`` tests cost far
    less than the expression scanning text that holds none (nearly all text). One-character tests come first, so
    that most text is scanned only a few times."""
    return (
        ("-" in text and ("sk-" in text or "xox" in text or "PRIVATE KEY" in text))
        or ("_" in text and ("gh" in text or "github_pat_" in text or "_live_" in text or "_test_" in text))
        or ("A" in text and ("AKIA" in text or "ASIA" in text or "AIza" in text))
    )


def _normalize(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


def _compile(source: str, *, user: bool = False) -> re.Pattern[str]:
    try:
        pattern = re.compile(source)
    except re.error as exc:
        raise ValueError(f"redaction pattern {source!r} is not a regular expression: {exc}") from None
    if user and pattern.search("") is not None:  # it would put [REDACTED] between every two characters
        raise ValueError(f"redaction pattern {source!r} matches the empty string")
    return pattern


def _substitution(pattern: re.Pattern[str]) -> _Substitute:
    """Replace whole matches, or only the ``secret`` group when the pattern has one."""
    if "secret" not in pattern.groupindex:
        return lambda text: pattern.sub(REDACTED, text)

    def keep_context(match: re.Match[str]) -> str:
        start, end = match.span("secret")
        if start < 0:  # the group did not take part in this match: hide it all
            return REDACTED
        whole = match.group(0)
        offset = match.start()
        return whole[: start - offset] + REDACTED + whole[end - offset :]

    return lambda text: pattern.sub(keep_context, text)


def _assignment_pattern(keys: Iterable[str]) -> str:
    """``<…key…>["']? [:=] value`` for the configured keys, ``-``/``_`` allowed anywhere in the key."""
    names = "|".join("[-_]?".join(re.escape(char) for char in key) for key in keys)
    value = (
        r'(?<=")[^"\\]*(?:\\.[^"\\]*)*(?=")'  # the inside of a double-quoted string (JSON escapes)
        r"|(?<=')[^']*(?=')"  # the inside of a single-quoted one
        rf"|(?:(?:{_AUTH_SCHEMES})\s+)?[^\s\"'&,;]+"  # an auth scheme and its credentials, or one word
    )
    return rf"(?i)(?:{names})[A-Za-z0-9_-]*[\"']?\s*[:=]\s*[\"']?(?P<secret>{value})"
