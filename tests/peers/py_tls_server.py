"""An independent wss peer for the client certificate tests: Python's `websockets` (its threaded
server) over Python's ssl module (OpenSSL) on 127.0.0.1, requiring a client certificate.

Usage: py_tls_server.py CERT KEY CLIENT_CA (PEM files). The server presents CERT with KEY and
requires a client certificate signed by CLIENT_CA (CERT_REQUIRED). Prints "port=N" once
listening, then "client NAME" with the common name of each client certificate it accepted, and
echoes every message, until stdin closes.

The threaded server rather than asyncio's: it does the TLS handshake on the socket itself, so a
refused client certificate gets its TLS alert (asyncio's SSL transport drops the connection
without sending the alert).
"""

import ssl
import sys
import threading

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve


def handler(ws):
    subject = ws.socket.getpeercert()["subject"]
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    print(f"client {' '.join(names)}", flush=True)
    try:
        for message in ws:
            ws.send(message)
    except ConnectionClosed:
        pass


def main():
    cert, key, client_ca = sys.argv[1:4]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    with serve(handler, "127.0.0.1", 0, ssl=context, max_size=None, compression=None) as server:
        print(f"port={server.socket.getsockname()[1]}", flush=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        sys.stdin.read()
        server.shutdown()


main()
