"""Tests for tradebalancer.transport.keys: the kernel's struct layout and the key schedule.

The keys it derives are checked against a real TLS server in test_transport_session.py.
"""

from __future__ import annotations

import ctypes
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given
from hypothesis import strategies as st

from tradebalancer.transport import keys as tls_keys


class _Info(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint16), ("cipher_type", ctypes.c_uint16)]


def _struct(iv: int, key: int, salt: int) -> type[ctypes.Structure]:
    """``struct tls12_crypto_info_*`` of include/uapi/linux/tls.h, rebuilt with ctypes."""

    class CryptoInfo(ctypes.Structure):
        _fields_ = [
            ("info", _Info),
            ("iv", ctypes.c_ubyte * iv),
            ("key", ctypes.c_ubyte * key),
            ("salt", ctypes.c_ubyte * salt),
            ("rec_seq", ctypes.c_ubyte * 8),
        ]

    return CryptoInfo


@pytest.mark.parametrize(
    ("cipher_type", "iv", "key", "salt", "size"),
    [
        (tls_keys.TLS_CIPHER_AES_GCM_128, 8, 16, 4, 40),
        (tls_keys.TLS_CIPHER_AES_GCM_256, 8, 32, 4, 56),
        (tls_keys.TLS_CIPHER_CHACHA20_POLY1305, 12, 32, 0, 56),
    ],
)
def test_pack_matches_the_kernel_struct(
    cipher_type: int, iv: int, key: int, salt: int, size: int
) -> None:
    """CryptoInfo.pack() lays out the bytes of the C struct in tls.h, field by field."""
    info = tls_keys.CryptoInfo(
        tls_keys.TLS_1_3_VERSION, cipher_type, os.urandom(key), os.urandom(iv), os.urandom(salt), 7
    )
    structure = _struct(iv, key, salt)()
    structure.info.version, structure.info.cipher_type = info.version, info.cipher_type
    structure.iv[:] = list(info.iv)
    structure.key[:] = list(info.key)
    if salt:
        structure.salt[:] = list(info.salt)
    structure.rec_seq[:] = list((7).to_bytes(8, "big"))
    assert ctypes.sizeof(structure) == size
    assert info.pack() == bytes(structure)
    assert "key" not in repr(info) and info.key.hex() not in repr(info)


@given(st.binary(min_size=1, max_size=64), st.binary(max_size=16), st.integers(1, 300))
def test_hkdf_expand_label_is_hkdf_expand_with_the_tls13_label(
    secret: bytes, context: bytes, length: int
) -> None:
    """hkdf_expand_label equals RFC 5869 HKDF-Expand with the HkdfLabel of RFC 8446 7.1."""
    label = b"tls13 key"
    info = length.to_bytes(2, "big") + bytes([len(label)]) + label
    info += bytes([len(context)]) + context
    secret = secret.ljust(32, b"\0")  # HKDF-Expand wants a PRK of at least the hash size
    expected = HKDFExpand(hashes.SHA256(), length, info).derive(secret)
    assert tls_keys.hkdf_expand_label(secret, b"key", context, length, "sha256") == expected


def test_derive_refuses_what_the_kernel_cannot_take() -> None:
    """An unsupported cipher or a missing secret is a ValueError that names it."""
    with pytest.raises(ValueError, match="ECDHE-RSA-AES128-SHA256"):
        tls_keys.derive_crypto_info(
            "TLSv1.2", "ECDHE-RSA-AES128-SHA256", {}, client_random=b"", server_random=b"",
            tx_seq=1, rx_seq=1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="SERVER_TRAFFIC_SECRET_0"):
        tls_keys.derive_crypto_info(
            "TLSv1.3", "TLS_AES_128_GCM_SHA256", {"CLIENT_TRAFFIC_SECRET_0": bytes(32)},
            client_random=b"", server_random=None, tx_seq=0, rx_seq=0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="ServerHello"):
        tls_keys.derive_crypto_info(
            "TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", {"CLIENT_RANDOM": bytes(48)},
            client_random=bytes(32), server_random=None, tx_seq=1, rx_seq=1,
        )  # fmt: skip
