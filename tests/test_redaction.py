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


def test_urls_anywhere_in_the_config_and_the_identity_keep_no_password_or_signature_and_more_secret_spellings_are_hidden():
    """Before: a password in input.uri or model.checkpoint (`https://user:pass@host`) went to run.json's
    config and identity as written; an endpoint's `?token=`, a pre-signed URL's signature, an sshfs
    `passphrase` and headers given as [name, value] pairs were kept in the storage options shown."""
    from pipeline.config import load_config, public_config
    from pipeline.results.runstore import run_identity

    cfg = load_config(
        {
            "input": {
                "uri": "https://alice:s3cr3tpass@data.example.com/archive/",
                "storage_options": {
                    "client_kwargs": {"endpoint_url": "https://minio.local/?X-Amz-Security-Token=tok123456&region=eu"},
                    "passphrase": "my ssh key passphrase",
                    "headers": [["Authorization", "Bearer abcdef123456"], ["Accept", "image/png"]],
                },
            },
            "model": {"name": "segformer-b0", "checkpoint": "https://bob:hf_TOKEN123456@models.example.com/m.safetensors"},
        }
    )
    shown = json.dumps(public_config(cfg)) + json.dumps(run_identity(cfg, "segformer-b0", 3, "abc"))
    for secret in ("s3cr3tpass", "hf_TOKEN123456", "tok123456", "my ssh key passphrase", "abcdef123456"):
        assert secret not in shown, secret
    assert "https://alice:***@data.example.com/archive" in shown and "region=eu" in shown and '["Accept", "image/png"]' in shown
    signed = "https://bucket.s3.amazonaws.com/a.png?X-Amz-Credential=AKIA1234&X-Amz-Signature=f00dbeef1234&X-Amz-Expires=60"
    assert redact(signed) == "https://bucket.s3.amazonaws.com/a.png?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    assert scrub(f"GET {signed} failed", {"endpoint_url": signed}).count("f00dbeef1234") == 0
