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
_SECRET_NAME = re.compile(
    r"(key$|keyid$|secret|passw|passphrase|token|credential|connectionstring|^sas|signature|^sig$|authorization|^auth$|cookie)"
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]+)@", re.IGNORECASE)
# a URL's query parameter (a pre-signed URL's X-Amz-Signature, an endpoint's ?token=): its value, where its
# name is a secret's
_QUERY_PARAM = re.compile(r"(?P<lead>[?&])(?P<name>[^=&#\s]+)=(?P<value>[^&#\s]*)")


def _hide_in_text(text: str) -> str:
    """A URL's password and its secret query values replaced by "***" (any text: a URI, a message)."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _QUERY_PARAM.sub(lambda m: f"{m['lead']}{m['name']}={REDACTED}" if is_secret_name(m["name"]) and m["value"] else m[0], text)


def _text_secrets(text: str) -> set[str]:
    """What `_hide_in_text` hides of `text`."""
    found = {m["password"] for m in _URL_USERINFO.finditer(text)}
    found.update(m["value"] for m in _QUERY_PARAM.finditer(text) if is_secret_name(m["name"]) and m["value"])
    return found


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(re.sub(r"[\s_-]", "", str(name).lower())))


def redact(options: Any) -> Any:
    """A JSON-ready copy of storage options with every credential value replaced by "***".

    Nested dicts (client_kwargs, config_kwargs, headers, ...) and lists are walked (a header given as
    a [name, value] pair too); a password inside a URL (`https://user:pass@host`) and a URL's secret
    query values (`?X-Amz-Signature=...`, `&token=...`) are hidden too; objects that are not plain data
    (a boto session, say) show as their type name only.
    """
    if _is_secret_pair(options):
        return [redact(options[0]), REDACTED]
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
        return _hide_in_text(options)
    if options is None or isinstance(options, (bool, int, float)):
        return options
    return f"<{type(options).__name__}>"


def _is_secret_pair(value: Any) -> bool:
    """A [name, value] pair whose name is a secret's (headers given as a list of pairs)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and isinstance(value[0], str)
        and is_secret_name(value[0])
        and value[1] is not None
    )


def secret_values(options: Any) -> set[str]:
    """Every credential string inside storage options (what `redact` hides)."""
    found: set[str] = set()

    def walk(value: Any, secret: bool) -> None:
        if _is_secret_pair(value):
            walk(value[1], True)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or is_secret_name(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif isinstance(value, str):
            if secret and value:
                found.add(value)
            found.update(_text_secrets(value))
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
