"""pipeline.redaction: credentials in storage options hidden from what is shown (run.json) and from error texts."""

from __future__ import annotations

import json

from pipeline.redaction import REDACTED, redact, scrub

CREDENTIALS = {
    "key": "AKIAREDACTME00000001",
    "secret": "s3cr3t-value-0001",
    "token": "session-token-0001",
    "password": "hunter2-0001",
    "client_kwargs": {
        "aws_access_key_id": "AKIAREDACTME00000002",
        "aws_secret_access_key": "s3cr3t-value-0002",
        "aws_session_token": "session-token-0002",
        "region_name": "eu-west-1",
        "endpoint_url": "https://minio-user:minio-pass-0003@minio.local:9000",
    },
    "config_kwargs": {"s3": {"addressing_style": "path"}, "proxies": {"https": "http://proxy-user:proxy-pass-0004@proxy:3128"}},
    "headers": {"Authorization": "Bearer bearer-0005", "X-Trace": "keep-me"},
    "account_name": "myaccount",
    "account_key": "account-key-0006",
    "sas_token": "sv=2024&sig=sas-0007",
    "connection_string": "DefaultEndpointsProtocol=https;AccountKey=conn-0008",
    "client_secret": "client-secret-0009",
    "credentials": {"type": "service_account", "private_key": "-----BEGIN KEY-----0010"},
    "s3_additional_kwargs": {"SSEKMSKeyId": "kms-key-id-0011"},
    "anon": False,
    "profile": "research",
    "use_ssl": True,
}
SECRET_VALUES = [
    "AKIAREDACTME00000001",
    "s3cr3t-value-0001",
    "session-token-0001",
    "hunter2-0001",
    "AKIAREDACTME00000002",
    "s3cr3t-value-0002",
    "session-token-0002",
    "minio-pass-0003",
    "proxy-pass-0004",
    "bearer-0005",
    "account-key-0006",
    "sas-0007",
    "conn-0008",
    "client-secret-0009",
    "0010",
    "kms-key-id-0011",
]


def test_redact_hides_every_credential_value():
    shown = redact(CREDENTIALS)
    text = json.dumps(shown)  # JSON-ready, as run.json needs
    for secret in SECRET_VALUES:
        assert secret not in text, secret
    assert shown["key"] == shown["client_kwargs"]["aws_secret_access_key"] == REDACTED
    # what helps a reader stays visible
    assert shown["client_kwargs"]["region_name"] == "eu-west-1"
    assert shown["client_kwargs"]["endpoint_url"] == f"https://minio-user:{REDACTED}@minio.local:9000"
    assert (shown["anon"], shown["profile"], shown["use_ssl"], shown["account_name"]) == (False, "research", True, "myaccount")
    assert shown["headers"]["X-Trace"] == "keep-me" and shown["config_kwargs"]["s3"] == {"addressing_style": "path"}
    assert CREDENTIALS["key"] == "AKIAREDACTME00000001"  # the caller's options are untouched
    assert redact({"session": object()}) == {"session": "<object>"}  # objects never print their insides


def test_scrub_removes_credentials_from_text():
    message = "GET https://minio-user:minio-pass-0003@host failed for AKIAREDACTME00000001 with s3cr3t-value-0001"
    cleaned = scrub(message, CREDENTIALS)
    assert not any(secret in cleaned for secret in SECRET_VALUES)
    assert "failed for" in cleaned and cleaned.count(REDACTED) == 3
