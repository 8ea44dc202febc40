#!/usr/bin/env python3
"""A small fault-injecting HTTP proxy for the AWS tests.

Forwards every request to --upstream (the moto server) and, at --rate, fails
it instead: a 429 ThrottlingException, a 500 or 503, a slow answer, or a
dropped connection (before forwarding, or after, so the change is made but
the answer is lost). Prints its own address on stdout once listening, then
serves until killed. Only the standard library; loopback only.

Bursts, as real outages come: `--burst throttle:223` fails the next 223
requests in a row that way (any fault name, or `permanent` for a 400
InvalidRequestException that no retry cures). A test changes the faults while
it runs with `POST /__faults` and a JSON body of any of `{"rate": 0.1,
"burst": ["error503", 40], "mode": "permanent"}` (`mode` fails every request
until set to null); `GET /__faults` returns the counts of what was injected.
"""
import argparse
import http.client
import http.server
import json
import random
import socketserver
import sys
import threading
import time
import urllib.parse

FAULTS = ["throttle", "throttle", "error500", "error503", "slow", "drop_before", "drop_after"]


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self, body):
        upstream = self.server.upstream
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        headers = [(k, v) for k, v in response.getheaders()
                   if k.lower() not in ("transfer-encoding", "connection", "content-length")]
        conn.close()
        return response.status, headers, data

    def reply(self, status, headers, data):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def aws_error(self, status, code, message):
        body = json.dumps({"__type": code, "message": message}).encode()
        self.reply(status, [("Content-Type", "application/json"), ("x-amzn-ErrorType", code)], body)

    def drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(2)
        except OSError:
            pass

    def control(self, body):
        server = self.server
        with server.lock:
            if self.command == "POST":
                change = json.loads(body or b"{}")
                if "rate" in change:
                    server.rate = float(change["rate"])
                if "burst" in change:
                    fault, count = change["burst"]
                    server.burst = [fault, int(count)]
                if "mode" in change:
                    server.mode = change["mode"]
            data = json.dumps(server.counts).encode()
        self.reply(200, [("Content-Type", "application/json")], data)

    def next_fault(self):
        server = self.server
        if server.mode:
            return server.mode
        if server.burst and server.burst[1] > 0:
            server.burst[1] -= 1
            return server.burst[0]
        return server.random.choice(FAULTS) if server.random.random() < server.rate else None

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.path.startswith("/__faults"):
            return self.control(body)
        server = self.server
        with server.lock:
            fault = self.next_fault()
            server.counts[fault or "forwarded"] = server.counts.get(fault or "forwarded", 0) + 1
        if fault == "permanent":
            return self.aws_error(400, "InvalidRequestException", "injected permanent failure")
        if fault == "throttle":
            return self.aws_error(429, "ThrottlingException", "Rate exceeded (injected)")
        if fault == "error500":
            return self.aws_error(500, "InternalFailureException", "injected failure")
        if fault == "error503":
            return self.aws_error(503, "ServiceUnavailableException", "injected unavailability")
        if fault == "drop_before":
            return self.drop()
        if fault == "slow":
            time.sleep(0.2)
        status, headers, data = self.forward(body)
        if fault == "drop_after":
            return self.drop()
        self.reply(status, headers, data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--burst", default=None, help="FAULT:COUNT, the next COUNT requests fail so")
    args = parser.parse_args()
    upstream = urllib.parse.urlparse(args.upstream)
    if upstream.hostname not in ("127.0.0.1", "localhost"):
        sys.exit("the fault proxy only forwards to loopback")
    server = Server(("127.0.0.1", 0), Proxy)
    server.upstream, server.rate = upstream, args.rate
    server.random, server.lock, server.counts = random.Random(args.seed), threading.Lock(), {}
    server.mode = None
    server.burst = None
    if args.burst:
        fault, count = args.burst.rsplit(":", 1)
        server.burst = [fault, int(count)]
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        print(json.dumps(server.counts), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
