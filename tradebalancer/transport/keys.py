"""The key schedule of kernel TLS: TLS secrets -> the kernel's ``crypto_info``.

Owns the cipher suites the kernel takes (``SUITES``), the ``struct tls12_crypto_info_*`` it is
given (``CryptoInfo``) and the derivation of both directions' key, IV, salt and sequence number
from a session's secrets. Pure computation: must not touch sockets, OpenSSL, the key log or the
clock (``session.py`` gathers the secrets and the sequence numbers, ``kernel.py`` hands the
result to the kernel). Only the standard library is used at run time.

Design, after include/uapi/linux/tls.h:

* Keys: TLS 1.3 per RFC 8446 7.1/7.3 (HKDF-Expand-Label "key" / "iv" of the traffic secret
  0); TLS 1.2 per RFC 5246 6.3 (PRF "key expansion"; AEAD suites have no MAC keys; GCM takes
  a 4-byte implicit IV, RFC 5288 3; ChaCha20-Poly1305 a 12-byte IV, RFC 7905 2).
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass

# include/uapi/linux/tls.h; Python 3.11 names none of them.
TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54


@dataclass(frozen=True)
class Suite:
    """A cipher suite as the kernel sees it."""

    cipher_type: int
    key_size: int
    salt_size: int  # the implicit part of the nonce; 0 for ChaCha20-Poly1305
    hash_name: str

    @property
    def iv_size(self) -> int:
        """Size of crypto_info.iv: the whole 12-byte nonce base minus the salt."""
        return 12 - self.salt_size


_AES_128 = Suite(TLS_CIPHER_AES_GCM_128, 16, 4, "sha256")
_AES_256 = Suite(TLS_CIPHER_AES_GCM_256, 32, 4, "sha384")
_CHACHA = Suite(TLS_CIPHER_CHACHA20_POLY1305, 32, 0, "sha256")
SUITES: Mapping[tuple[str, str], Suite] = {
    ("TLSv1.3", "TLS_AES_128_GCM_SHA256"): _AES_128,
    ("TLSv1.3", "TLS_AES_256_GCM_SHA384"): _AES_256,
    ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256"): _CHACHA,
    **{("TLSv1.2", f"ECDHE-{auth}-AES128-GCM-SHA256"): _AES_128 for auth in ("ECDSA", "RSA")},
    **{("TLSv1.2", f"ECDHE-{auth}-AES256-GCM-SHA384"): _AES_256 for auth in ("ECDSA", "RSA")},
    **{("TLSv1.2", f"ECDHE-{auth}-CHACHA20-POLY1305"): _CHACHA for auth in ("ECDSA", "RSA")},
}


@dataclass(frozen=True, repr=False)
class CryptoInfo:
    """One direction's ``struct tls12_crypto_info_*``, exactly as handed to the kernel."""

    version: int  # TLS_1_2_VERSION or TLS_1_3_VERSION
    cipher_type: int
    key: bytes
    iv: bytes
    salt: bytes
    rec_seq: int  # the sequence number of the next record

    def pack(self) -> bytes:
        """The struct's bytes: u16 version, u16 cipher_type (host order), iv, key, salt, rec_seq."""
        return (
            struct.pack("=HH", self.version, self.cipher_type)
            + self.iv
            + self.key
            + self.salt
            + self.rec_seq.to_bytes(8, "big")
        )

    def __repr__(self) -> str:  # never show key material
        return (
            f"CryptoInfo(version={self.version:#06x}, cipher={self.cipher_type}, "
            f"rec_seq={self.rec_seq})"
        )


def hkdf_expand_label(
    secret: bytes, label: bytes, context: bytes, length: int, hash_name: str
) -> bytes:
    """HKDF-Expand-Label of RFC 8446 7.1 (HKDF-Expand of RFC 5869 2.3 with a TLS 1.3 info)."""
    full_label = b"tls13 " + label
    info = (
        struct.pack("!HB", length, len(full_label)) + full_label + bytes([len(context)]) + context
    )
    output, block = b"", b""
    counter = 1
    while len(output) < length:
        block = hmac.digest(secret, block + info + bytes([counter]), hash_name)
        output += block
        counter += 1
    return output[:length]


def tls12_prf(secret: bytes, label: bytes, seed: bytes, length: int, hash_name: str) -> bytes:
    """The TLS 1.2 PRF of RFC 5246 5: P_hash(secret, label + seed)."""
    seed = label + seed
    output, a = b"", seed
    while len(output) < length:
        a = hmac.digest(secret, a, hash_name)
        output += hmac.digest(secret, a + seed, hash_name)
    return output[:length]


def derive_crypto_info(
    version: str,
    cipher: str,
    secrets: Mapping[str, bytes],
    *,
    client_random: bytes,
    server_random: bytes | None,
    tx_seq: int,
    rx_seq: int,
    tx_nonce: bytes | None = None,
) -> tuple[CryptoInfo, CryptoInfo]:
    """The client's (transmit, receive) kernel parameters for a session.

    ``version`` and ``cipher`` are what ``SSLObject.version()``/``cipher()[0]`` say; ``secrets``
    maps NSS key log labels to this session's secrets; ``tx_nonce`` is the TLS 1.2 AES-GCM
    explicit nonce of the next record sent (the sequence number if None). Raises ValueError,
    with a reason fit for a log, when the kernel cannot take this session.
    """
    suite = SUITES.get((version, cipher))
    if suite is None:
        raise ValueError(f"cipher {cipher} ({version}) is not supported by kernel TLS")
    if version == "TLSv1.3":
        infos = []
        for label, seq in (
            ("CLIENT_TRAFFIC_SECRET_0", tx_seq),
            ("SERVER_TRAFFIC_SECRET_0", rx_seq),
        ):
            secret = _secret(secrets, label)
            key = hkdf_expand_label(secret, b"key", b"", suite.key_size, suite.hash_name)
            iv = hkdf_expand_label(secret, b"iv", b"", 12, suite.hash_name)
            salt, iv = iv[: suite.salt_size], iv[suite.salt_size :]
            infos.append(CryptoInfo(TLS_1_3_VERSION, suite.cipher_type, key, iv, salt, seq))
        return infos[0], infos[1]
    if server_random is None:
        raise ValueError("the ServerHello was not seen, so the TLS 1.2 keys cannot be derived")
    master_secret = _secret(secrets, "CLIENT_RANDOM")
    fixed_iv = 12 if suite.salt_size == 0 else suite.salt_size  # RFC 7905 2 / RFC 5288 3
    block = tls12_prf(
        master_secret,
        b"key expansion",
        server_random + client_random,
        2 * (suite.key_size + fixed_iv),
        suite.hash_name,
    )
    client_key, server_key = block[: suite.key_size], block[suite.key_size : 2 * suite.key_size]
    client_iv = block[2 * suite.key_size : 2 * suite.key_size + fixed_iv]
    server_iv = block[2 * suite.key_size + fixed_iv :]
    if suite.salt_size == 0:  # ChaCha20-Poly1305: the nonce is iv XOR sequence, as in 1.3
        tx = CryptoInfo(TLS_1_2_VERSION, suite.cipher_type, client_key, client_iv, b"", tx_seq)
        rx = CryptoInfo(TLS_1_2_VERSION, suite.cipher_type, server_key, server_iv, b"", rx_seq)
        return tx, rx
    explicit = tx_nonce if tx_nonce is not None else tx_seq.to_bytes(8, "big")
    tx = CryptoInfo(TLS_1_2_VERSION, suite.cipher_type, client_key, explicit, client_iv, tx_seq)
    rx_iv = rx_seq.to_bytes(8, "big")  # unused: the kernel reads each record's explicit nonce
    rx = CryptoInfo(TLS_1_2_VERSION, suite.cipher_type, server_key, rx_iv, server_iv, rx_seq)
    return tx, rx


def _secret(secrets: Mapping[str, bytes], label: str) -> bytes:
    try:
        return secrets[label]
    except KeyError:
        raise ValueError(f"OpenSSL's key log has no {label} line for this session") from None
