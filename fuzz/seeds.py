#!/usr/bin/env python3
"""Writes the committed seed corpora in fuzz/corpus/ (run from anywhere; rewrites them all).

Seeds are small, meaningful inputs the fuzzer starts from: valid frame streams and violations,
real 101 responses and refusals, URIs accepted and refused. The layouts are those that
wsclient::testing::fuzz_frames, fuzz_upgrade_response and fuzz_uri document.
"""
import base64
import hashlib
import os
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def frame(first, payload=b"", length=None):
    n = len(payload) if length is None else length
    if n < 126:
        head = bytes([first, n])
    elif n < 65536:
        head = bytes([first, 126]) + struct.pack(">H", n)
    else:
        head = bytes([first, 127]) + struct.pack(">Q", n)
    return head + payload


def frames_input(stream, max_byte=255, read_byte=8, cuts=b""):
    # byte 0: max message (255 = the 64 MiB default, else 1 + b*b); byte 1: read size
    # (256 << b % 9); byte 2: number of cut bytes; then the cuts and the stream.
    return bytes([max_byte, read_byte, len(cuts)]) + cuts + stream


def close(code, reason=b""):
    return frame(0x88, struct.pack(">H", code) + reason)


FRAMES = {
    "text": frames_input(frame(0x81, b"hello")),
    "binary-text-close": frames_input(
        frame(0x82, b"\x01\x02\x03") + frame(0x81, "héllo".encode()) + close(1000, b"bye"),
        cuts=bytes([3, 7]),
    ),
    "fragments-ping-between": frames_input(
        frame(0x02, b"frag") + frame(0x89, b"ping between fragments") + frame(0x80, b"mented"),
        read_byte=0,
        cuts=bytes([1]),
    ),
    "text-split-in-a-character": frames_input(
        frame(0x01, "h€".encode()[:2]) + frame(0x00, "h€".encode()[2:3]) + frame(0x80, "h€".encode()[3:]),
    ),
    "len16": frames_input(frame(0x82, bytes(range(256)) + bytes(44)), cuts=bytes([0x45, 0x80])),
    "len64-non-minimal": frames_input(b"\x82\x7f" + struct.pack(">Q", 5) + b"abcde"),
    "controls": frames_input(
        frame(0x89) + frame(0x8A, b"pong") + frame(0x89, b"x" * 125) + frame(0x88),
        cuts=bytes([2, 2, 0xC0]),
    ),
    "close-code-only": frames_input(close(1001) + frame(0x81, b"after close")),
    "close-4000": frames_input(close(4000, "déjà".encode())),
    "too-big": frames_input(frame(0x81, b"0123456789abcdefghij"), max_byte=3),
    "too-big-fragments": frames_input(frame(0x02, b"x" * 8) + frame(0x80, b"y" * 8), max_byte=3),
    "large-partial": frames_input(frame(0x82, b"z" * 1000, length=20000), read_byte=0, cuts=bytes([0xFF])),
    "large-complete": frames_input(
        frame(0x82, bytes(i % 251 for i in range(16500))) + frame(0x81, b"next"),
        read_byte=0,
        cuts=bytes([0xFF, 0x3F]),
    ),
    "reserved-bits": frames_input(frame(0xC1, b"x")),
    "masked": frames_input(b"\x81\x81\x01\x02\x03\x04x"),
    "reserved-opcode": frames_input(frame(0x83, b"x")),
    "fragmented-ping": frames_input(frame(0x09, b"x")),
    "long-ping": frames_input(frame(0x89, b"p" * 126)),
    "continuation-alone": frames_input(frame(0x80, b"x")),
    "new-message-mid-fragments": frames_input(frame(0x01, b"a") + frame(0x81, b"b")),
    "invalid-utf8": frames_input(frame(0x81, b"a\xc3")),
    "invalid-close-code": frames_input(close(1005)),
    "msb-length": frames_input(b"\x82\x7f\x80" + bytes(7)),
    "many-small": frames_input(
        b"".join(frame(0x81 if i % 2 else 0x82, bytes([i]) * i) for i in range(40)),
        read_byte=1,
        cuts=bytes([5, 0x41, 1]),
    ),
}

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # wsclient::testing::FUZZ_UPGRADE_KEY
ACCEPT = base64.b64encode(
    hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
)  # s3pPLMBiTxaQ9kYGzzhZRbK+xOo=


def response(lines, offer=0, tail=b"", end=b"\r\n"):
    # byte 0: subprotocols offered (bit 0 "chat", bit 1 "superchat").
    return bytes([offer]) + end.join(lines) + end + end + tail


ACC = b"Sec-WebSocket-Accept: " + ACCEPT
UPGRADE = {
    "minimal": response([b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade", ACC]),
    "with-frames-after": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade", ACC],
        tail=b"\x81\x05hello\x89\x00",
    ),
    "node-ws": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade", ACC, b"Sec-WebSocket-Protocol: chat"],
        offer=3,
    ),
    "python-websockets": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Date: Wed, 26 Nov 2025 06:25:00 GMT", b"Upgrade: websocket",
         b"Connection: Upgrade", ACC, b"Server: Python/3.11 websockets/13.1"],
    ),
    "tungstenite": response(
        [b"HTTP/1.1 101 Switching Protocols", b"connection: Upgrade", b"upgrade: websocket", b"sec-websocket-accept: " + ACCEPT],
    ),
    "bare-lf": response([b"HTTP/1.1 101 OK", b"Upgrade: WebSocket", b"Connection: upgrade", ACC], end=b"\n"),
    "connection-list": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: keep-alive, Upgrade", ACC],
    ),
    "connection-two-lines": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: keep-alive", b"Connection: Upgrade", ACC],
    ),
    "protocol-not-offered": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade", ACC, b"Sec-WebSocket-Protocol: superchat"],
        offer=1,
    ),
    "extension-not-offered": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade", ACC,
         b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"],
    ),
    "wrong-accept": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
         b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA="],
    ),
    "http10": response([b"HTTP/1.0 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade", ACC]),
    "forbidden": response([b"HTTP/1.1 403 Forbidden", b"Content-Length: 8"], tail=b"go away\n"),
    "redirect": response([b"HTTP/1.1 301 Moved Permanently", b"Location: wss://example.com/"]),
    "partial": bytes([0]) + b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: webso",
    "folded-header": response(
        [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection:", b" Upgrade", ACC],
    ),
}

URIS = [
    "ws://127.0.0.1:9000/echo",
    "wss://example.com/chat?room=1&x=%20y",
    "ws://[::1]:8080/",
    "wss://[fe80::1%25eth0]:443/p",
    "WSS://Example.COM",
    "ws://localhost:65535/a/b/c;p?q",
    "ws://host?x=1",
    "ws://host:/",
    "ws://host/caf\u00e9",
    "ws://user@host/",
    "ws://host:0/",
    "ws://host/#frag",
    "http://example.com/",
    "ws:///path",
    "ws://host:99999/",
    "wss://xn--bcher-kva.example/",
    # The fuzzer's first finding: a host with a bracket that is not an IPv6 literal is accepted.
    "ws://Wss[::1]:8180/",
]


# deflate: byte 0 with bit 7 set, then a Sec-WebSocket-Extensions answer; bit 7 clear, then server
# frames read with permessage-deflate agreed (wsclient::testing::fuzz_deflate).
HELLO = bytes([0xF2, 0x48, 0xCD, 0xC9, 0xC9, 0x07, 0x00])  # "Hello", RFC 7692 7.2.3.1
ZEROS = bytes.fromhex("ecc13101000000c2a0f54f6d0a3fa00000000080b701")  # 5000 zeros, over the 4 KiB limit
DEFLATE = {
    "answer-plain": b"\x80permessage-deflate",
    "answer-all": b"\x87permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
    b"server_max_window_bits=9; client_max_window_bits=10",
    "answer-duplicate": b"\x80permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
    "answer-two": b"\x80permessage-deflate, x-other",
    "hello": b"\x0e" + frame(0xC1, HELLO),
    "hello-fragmented-ping": b"\x0e" + frame(0x41, HELLO[:3]) + frame(0x89, b"p") + frame(0x80, HELLO[3:]),
    "hello-twice-no-takeover": b"\x01" + frame(0xC1, HELLO) + frame(0xC1, HELLO),
    "zeros-over-limit": b"\x0e" + frame(0xC2, ZEROS),
    "empty": b"\x0e" + frame(0xC2, b"\x00") + frame(0xC1, b""),
    "corrupt": b"\x0e" + frame(0xC1, b"\xff\xff\xff"),
    "rsv1-control": b"\x0e" + frame(0xC9, b""),
}


def write(target, name, data):
    with open(os.path.join(ROOT, target, "seed-" + name), "wb") as f:
        f.write(data)


if __name__ == "__main__":
    for target in ("frames", "upgrade_response", "uri", "deflate"):
        shutil.rmtree(os.path.join(ROOT, target), ignore_errors=True)
        os.makedirs(os.path.join(ROOT, target))
    for name, data in FRAMES.items():
        write("frames", name, data)
    for name, data in UPGRADE.items():
        write("upgrade_response", name, data)
    for i, uri in enumerate(URIS):
        write("uri", f"{i:02}", uri.encode())
    for name, data in DEFLATE.items():
        write("deflate", name, data)
