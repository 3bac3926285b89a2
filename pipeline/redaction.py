"""Credentials in storage options: which option names hold them, a copy safe to show (`redact`: run.json,
logs) and any text with their values removed (`scrub`: an exception message, say).

A leaf below the config: the config redacts what run.json shows, the storage layer and the readers
scrub their errors; it imports no other module of segpipe.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
# Option names whose values are credentials, in any store's spelling: s3fs key/secret/token,
# boto aws_access_key_id / aws_secret_access_key / aws_session_token, gcsfs token, adlfs account_key /
# sas_token / connection_string / client_secret / credential, HTTP headers such as Authorization.
# Names are compared lower-cased with `_`, `-` and spaces removed ("aws_access_key_id" -> "awsaccesskeyid").
_SECRET_NAME = re.compile(r"(key$|keyid$|secret|passw|token|credential|connectionstring|^sas|signature|authorization|^auth$|cookie)")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(re.sub(r"[\s_-]", "", str(name).lower())))


def redact(options: Any) -> Any:
    """A JSON-ready copy of storage options with every credential value replaced by "***".

    Nested dicts (client_kwargs, config_kwargs, headers, ...) and lists are walked; a password
    inside a URL (`https://user:pass@host`) is hidden too; objects that are not plain data (a
    boto session, say) show as their type name only.
    """
    if isinstance(options, dict):
        out = {}
        for name, value in options.items():
            if is_secret_name(name) and value is not None and not isinstance(value, bool):
                out[str(name)] = REDACTED
            else:
                out[str(name)] = redact(value)
        return out
    if isinstance(options, (list, tuple)):
        return [redact(v) for v in options]
    if isinstance(options, str):
        return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", options)
    if options is None or isinstance(options, (bool, int, float)):
        return options
    return f"<{type(options).__name__}>"


def secret_values(options: Any) -> set[str]:
    """Every credential string inside storage options (what `redact` hides)."""
    found: set[str] = set()

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or is_secret_name(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif isinstance(value, str):
            if secret and value:
                found.add(value)
            found.update(m["password"] for m in _URL_USERINFO.finditer(value))
        elif secret and isinstance(value, (int, float)) and not isinstance(value, bool):
            found.add(str(value))

    walk(options, False)
    return found


def scrub(text: str, *options: Any) -> str:
    """text with every credential value of the given storage options replaced by "***".

    Values shorter than 6 characters are left alone: no real credential is that short, and
    replacing every "s" or "1" would garble the text.
    """
    secrets = set().union(*(secret_values(o) for o in options)) if options else set()
    for secret in sorted((s for s in secrets if len(s) >= 6), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
