"""The AES-256-GCM vault: keyring rotation, associated-data binding, tampering, unknown key ids."""

from __future__ import annotations

import os
import uuid

import pytest

from control_api.audio_formats import AudioFormat, audio_format_or_none, parse_audio_format
from control_api.vault import NONCE_BYTES, DecryptionFailed, Sealed, UnknownKeyId, Vault

TENANT = uuid.uuid4()
OTHER_TENANT = uuid.uuid4()
CREDENTIAL = uuid.uuid4()
SECRET = b'{"api_key":"sk_plaintext_never_logged_0123456789"}'


def _key() -> bytes:
    return os.urandom(32)


def _bind(**overrides):
    """The row a ciphertext belongs to: tenant, credential id and provider."""
    return {"tenant_id": TENANT, "credential_id": CREDENTIAL, "provider": "elevenlabs"} | overrides


def test_round_trip() -> None:
    vault = Vault([("k1", _key())])
    sealed = vault.encrypt(SECRET, **_bind())
    assert sealed.key_id == "k1"
    assert len(sealed.nonce) == NONCE_BYTES
    assert SECRET not in sealed.ciphertext
    assert vault.decrypt(sealed, **_bind()) == SECRET


def test_every_encryption_uses_a_fresh_nonce() -> None:
    vault = Vault([("k1", _key())])
    nonces = {vault.encrypt(SECRET, **_bind()).nonce for _ in range(50)}
    assert len(nonces) == 50


def test_rotation_old_ciphertexts_decrypt_and_new_ones_use_the_new_key() -> None:
    key1, key2 = _key(), _key()
    before = Vault([("k1", key1)])
    old = before.encrypt(SECRET, **_bind())

    after = Vault([("k2", key2), ("k1", key1)])
    assert after.active_key_id == "k2"
    assert after.decrypt(old, **_bind()) == SECRET
    new = after.encrypt(SECRET, **_bind())
    assert new.key_id == "k2"
    assert after.needs_rewrap(old)
    assert not after.needs_rewrap(new)

    rewrapped = after.rewrap(old, **_bind())
    assert rewrapped.key_id == "k2"
    assert rewrapped.nonce != old.nonce
    # Once rewrapped, key 1 can be retired.
    assert Vault([("k2", key2)]).decrypt(rewrapped, **_bind()) == SECRET


@pytest.mark.parametrize(
    "moved",
    [
        {"tenant_id": OTHER_TENANT},
        {"credential_id": uuid.uuid4()},
        {"provider": "twilio"},
    ],
    ids=["other-tenant", "other-credential", "other-provider"],
)
def test_a_ciphertext_moved_to_another_row_fails(moved: dict[str, object]) -> None:
    vault = Vault([("k1", _key())])
    sealed = vault.encrypt(SECRET, **_bind())
    with pytest.raises(DecryptionFailed):
        vault.decrypt(sealed, **_bind(**moved))


def test_tampered_ciphertext_or_nonce_fails() -> None:
    vault = Vault([("k1", _key())])
    sealed = vault.encrypt(SECRET, **_bind())
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(DecryptionFailed):
        vault.decrypt(Sealed(sealed.key_id, sealed.nonce, flipped), **_bind())
    other_nonce = bytes([sealed.nonce[0] ^ 1]) + sealed.nonce[1:]
    with pytest.raises(DecryptionFailed):
        vault.decrypt(Sealed(sealed.key_id, other_nonce, sealed.ciphertext), **_bind())
    with pytest.raises(DecryptionFailed):
        vault.decrypt(Sealed(sealed.key_id, b"short", sealed.ciphertext), **_bind())


def test_wrong_key_under_the_same_id_fails() -> None:
    sealed = Vault([("k1", _key())]).encrypt(SECRET, **_bind())
    with pytest.raises(DecryptionFailed):
        Vault([("k1", _key())]).decrypt(sealed, **_bind())


def test_unknown_key_id_is_a_clear_error() -> None:
    sealed = Vault([("retired", _key())]).encrypt(SECRET, **_bind())
    with pytest.raises(UnknownKeyId, match="'retired'.*not in ENCRYPTION_KEYS"):
        Vault([("k2", _key())]).decrypt(sealed, **_bind())


def test_repr_shows_no_key_material() -> None:
    key = _key()
    vault = Vault([("k1", key)])
    sealed = vault.encrypt(SECRET, **_bind())
    for text in (repr(vault), str(vault), repr(sealed)):
        assert key.hex() not in text
        assert repr(key) not in text
        assert sealed.ciphertext.hex() not in text
    assert "k1" in repr(vault)


def test_bad_keyrings_are_refused() -> None:
    with pytest.raises(ValueError):
        Vault([])
    with pytest.raises(ValueError):
        Vault([("k1", b"short")])
    with pytest.raises(ValueError):
        Vault([("k1", _key()), ("k1", _key())])


def test_audio_formats() -> None:
    assert [f.value for f in AudioFormat] == [
        "pcm_8000",
        "pcm_16000",
        "pcm_22050",
        "pcm_24000",
        "pcm_44100",
        "pcm_48000",
        "ulaw_8000",
    ]
    ulaw = parse_audio_format("ulaw_8000")
    assert (ulaw.encoding, ulaw.sample_rate, ulaw.bytes_per_sample) == ("ulaw", 8000, 1)
    assert ulaw.bytes_for_ms(20) == 160
    pcm = parse_audio_format("pcm_16000")
    assert (pcm.encoding, pcm.bytes_per_second, pcm.bytes_for_ms(20)) == ("pcm", 32000, 640)
    assert AudioFormat.pcm_22050.bytes_for_ms(10) == 440
    with pytest.raises(ValueError):
        parse_audio_format("mp3_44100")
    assert audio_format_or_none("PCM_16000") is None
    assert audio_format_or_none(16000) is None
