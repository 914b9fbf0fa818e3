"""Tests for tradebalancer.transport.kernel: control records, and recvmsg reads on this machine.

``install`` is run through ``Session.hand_off``: in test_transport_session.py without the tls
module, in test_ktls_vm.py in a kernel that has it.
"""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradebalancer.errors import TransportError
from tradebalancer.transport import kernel as tls_kernel
from tradebalancer.transport import keys as tls_keys


def _control(version: int, *records: tuple[int, bytes]) -> tuple[bool, tls_kernel.ControlRecords]:
    control = tls_kernel.ControlRecords(version)
    closed = False
    for record_type, payload in records:
        closed = control.receive(record_type, payload) or closed
    return closed, control


def _message(kind: int, body: bytes = b"") -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


TLS13, TLS12 = tls_keys.TLS_1_3_VERSION, tls_keys.TLS_1_2_VERSION
HS, ALERT = tls_kernel.HANDSHAKE, tls_kernel.ALERT


@pytest.mark.parametrize(
    ("version", "records", "closed", "error"),
    [
        (TLS13, [(HS, _message(4, bytes(40)))], False, None),
        (TLS13, [(HS, _message(4, bytes(9)) + _message(4, bytes(3)))], False, None),
        (
            TLS13,
            [(HS, _message(4, bytes(40))[:10]), (HS, _message(4, bytes(40))[10:])],
            False,
            None,
        ),
        (TLS13, [(HS, _message(24, b"\x00"))], False, "KeyUpdate"),
        (TLS13, [(HS, _message(13, bytes(8)))], False, "unexpected handshake message (type 13)"),
        (TLS12, [(HS, _message(0))], False, None),
        (TLS13, [(ALERT, b"\x01\x00")], True, None),
        (TLS13, [(ALERT, b"\x01\x5a"), (ALERT, b"\x01\x00")], True, None),
        (TLS13, [(ALERT, b"\x02\x14")], False, "bad_record_mac (20)"),
        (TLS13, [(ALERT, b"\x01\x28")], False, "handshake_failure (40)"),
        (TLS12, [(ALERT, b"\x01\x64")], False, None),
        (TLS12, [(ALERT, b"\x02\x50")], False, "internal_error (80)"),
        (TLS13, [(ALERT, b"\x01")], False, "malformed"),
        (TLS13, [(20, b"\x01")], False, "content type 20"),
    ],
)
def test_control_records(
    version: int, records: list[tuple[int, bytes]], closed: bool, error: str | None
) -> None:
    """Control records: tickets and HelloRequest are skipped, close_notify ends, the rest fail."""
    got_closed, control = _control(version, *records)
    assert got_closed is closed
    if error is None:
        assert control.error is None
    else:
        assert control.error is not None and error in control.error


@given(st.sampled_from([TLS12, TLS13]), st.lists(st.tuples(st.integers(0, 255), st.binary())))
def test_control_records_never_raise(version: int, records: list[tuple[int, bytes]]) -> None:
    """Whatever the server sends, ControlRecords records an error instead of raising."""
    closed, control = _control(version, *records)
    assert isinstance(closed, bool)
    assert control.error is None or isinstance(control.error, str)


def test_receive_into_reads_plain_data_and_eof() -> None:
    """Without record-type control messages, recvmsg data is application data; 0 is EOF."""
    left, right = socket.socketpair()
    right.sendall(b"payload")
    right.shutdown(socket.SHUT_WR)
    buffer = memoryview(bytearray(64))
    control = tls_kernel.ControlRecords(TLS13)
    count = tls_kernel.receive_into(left, buffer, control, "pair")
    assert bytes(buffer[:count]) == b"payload"
    assert tls_kernel.receive_into(left, buffer, control, "pair") == 0
    left.close()
    right.close()


def test_receive_into_translates_a_reset() -> None:
    """A connection reset during a kernel TLS read is a TransportError naming ECONNRESET."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    client.sendall(b"unread")  # unread data makes close() send a reset
    time.sleep(0.05)
    server.close()
    client.settimeout(5)
    with pytest.raises(TransportError, match="ECONNRESET"):
        tls_kernel.receive_into(
            client, memoryview(bytearray(64)), tls_kernel.ControlRecords(TLS13), "here"
        )
    client.close()
    listener.close()
