"""An HTTPS front for the tests' OTLP receiver: terminates TLS with the given certificate and
forwards each POST, unchanged, to the plain-HTTP receiver (so the agent's TLS client meets a real
TLS server, and the spans are still decoded by the receiver).

Usage: python tls_forward.py PORT CERT KEY UPSTREAM_URL
"""
import http.server
import ssl
import sys
import urllib.request

port, cert, key, upstream = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]


class Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = urllib.request.Request(upstream + self.path, data=body,
                                         headers={"content-type": self.headers.get("content-type", "")})
        try:
            status = urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as e:
            status = e.code
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Forward)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("listening", flush=True)
server.serve_forever()
