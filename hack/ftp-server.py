#!/usr/bin/env python3
"""FTP/FTPS test server for virtplane's download tests (tests/download.rs).

Serves --root read-only to one user on a loopback port with pyftpdlib. Prints
"READY <port>" on stdout once listening, then one JSON line per finished or
aborted transfer: {"cmd": "RETR", "file": ..., "completed": bool, "bytes": N},
N being the bytes sent over the data connection (after any REST offset).

With --tls-cert/--tls-key it requires explicit TLS (AUTH TLS) on the control
and data connections. --rate limits each data connection to that many bytes
per second (plain FTP only), so a test can pause a transfer midway.

Needs pyftpdlib and pyOpenSSL: hack/install-deps.sh installs them.
"""

import argparse
import json
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler, TLS_FTPHandler
from pyftpdlib.servers import FTPServer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--user", default="tester")
    parser.add_argument("--password", default="secret")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--rate", type=int, default=0)
    args = parser.parse_args()

    base = TLS_FTPHandler if args.tls_cert else FTPHandler

    class Handler(base):
        def log_transfer(self, cmd, filename, receive, completed, elapsed, bytes):
            print(
                json.dumps(
                    {"cmd": cmd, "file": filename, "completed": bool(completed), "bytes": bytes}
                ),
                flush=True,
            )
            super().log_transfer(cmd, filename, receive, completed, elapsed, bytes)

    authorizer = DummyAuthorizer()
    authorizer.add_user(args.user, args.password, args.root, perm="elr")
    Handler.authorizer = authorizer
    Handler.passive_ports = None
    if args.tls_cert:
        Handler.certfile = args.tls_cert
        Handler.keyfile = args.tls_key
        Handler.tls_control_required = True
        Handler.tls_data_required = True
    elif args.rate > 0:

        class Throttled(ThrottledDTPHandler):
            write_limit = args.rate

        Handler.dtp_handler = Throttled

    server = FTPServer((args.host, args.port), Handler)
    port = server.socket.getsockname()[1]
    print(f"READY {port}", flush=True)
    try:
        server.serve_forever(handle_exit=True)
    finally:
        server.close_all()


if __name__ == "__main__":
    sys.exit(main())
