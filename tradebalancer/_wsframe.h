/*
 * Websocket frames from the server, read in place (RFC 6455 section 5.2).
 *
 * Owns one question: where does the frame at s[i] end, and is it a plain data frame, one the
 * balancer routes straight from the receive buffer? Plain: FIN set, RSV bits clear, opcode
 * text (1) or binary (2), not masked (a server never masks), a payload of at most max_size
 * bytes. Anything else (control frames, fragments, a masked or
 * oversized frame, reserved bits, an 8-byte length with its top bit set) goes whole to
 * websockets' ClientProtocol, which answers, reassembles or fails the connection as it would
 * without this path. frames.py is the reference in Python and says why.
 */
#ifndef TRADEBALANCER_WSFRAME_H
#define TRADEBALANCER_WSFRAME_H

#include <stdint.h>

#define WS_SHORT 0 /* the header is not all there */
#define WS_PLAIN 1
#define WS_OTHER 2

/* Read the frame header at s[i]: *payload is where the payload starts, *end one past it
   (which may be past n: the caller checks that the frame is whole). */
static inline int ws_frame(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t max_size,
                           Py_ssize_t *payload, Py_ssize_t *end)
{
    if (n - i < 2)
        return WS_SHORT;
    unsigned char head = s[i], second = s[i + 1];
    uint64_t length = second & 0x7f;
    Py_ssize_t at = i + 2;
    if (length == 126) {
        if (n - at < 2)
            return WS_SHORT;
        length = ((uint64_t)s[at] << 8) | s[at + 1];
        at += 2;
    } else if (length == 127) {
        if (n - at < 8)
            return WS_SHORT;
        length = 0;
        for (int k = 0; k < 8; k++)
            length = (length << 8) | s[at + k];
        at += 8;
        if (length >> 62) /* far past any max_size: websockets refuses it from the header */
            length = (uint64_t)1 << 62;
    }
    if (second & 0x80)
        at += 4; /* the mask, were one there (a protocol error websockets reports) */
    *payload = at;
    *end = at + (Py_ssize_t)length;
    int plain = (head == 0x81 || head == 0x82) && !(second & 0x80) && (Py_ssize_t)length <= max_size;
    return plain ? WS_PLAIN : WS_OTHER;
}

#endif
