"""Secrets out of anything printed, logged or stored: passwords in URLs and secret-looking query values."""

from __future__ import annotations

import re
from urllib.parse import unquote

_PASSWORD_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")
# ?api_key=... &token=...: the value ends at the next parameter, fragment, whitespace or quote (text may be JSON)
_SECRET_QUERY = re.compile(r"(?i)([?&][^=&\s\"']*(?:key|token|secret|sig|password)[^=&\s\"']*=)[^&#\s\"']*")


def mask(text: str) -> str:
    """`text` with every password in a URL and every secret-looking query value replaced by ***."""
    text = _PASSWORD_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _SECRET_QUERY.sub(r"\1***", text)


def without_password(url: str) -> tuple[str, str | None]:
    """(url without its password, the password): hand the password to a child process by environment, not argv."""
    match = _PASSWORD_IN_URL.match(url)
    if not match or not match["pw"]:
        return url, None
    return f"{match['scheme']}{match['user']}@" + url[match.end():], unquote(match["pw"])
