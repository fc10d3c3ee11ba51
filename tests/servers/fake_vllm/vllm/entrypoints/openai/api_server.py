"""A process that looks like vLLM's API server from /proc (its command line is
`python3 -m vllm.entrypoints.openai.api_server ...`) and answers like one where the tests need
it: /metrics (a few vLLM families), /version, /v1/models, /health. It is not vLLM: the tests use it
for what discovery, scraping and the agent's defences see, where a real vLLM would be too slow or
cannot be placed (another network namespace, a hostile impersonator).

Options: --host, --port, --model NAME, --served-model-name NAME, --mode {serve,silent,huge}
  serve   answer as above
  silent  accept connections and never answer (an impersonator that stalls describers)
  huge    /metrics is a page of --samples samples (a hostile page)
"""

import argparse
import http.server
import json
import socketserver
import sys
import time


def metrics_page(model, samples):
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{engine="0",model_name="{model}"}} 0.0',
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{engine="0",model_name="{model}"}} 0.0',
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="{model}"}} 0.0',
    ]
    if samples:
        lines.append("# HELP vllm:flood_total A family with very many samples.")
        lines.append("# TYPE vllm:flood_total counter")
        for i in range(samples):
            lines.append(f'vllm:flood_total{{i="{i}"}} {i}.0')
    return ("\n".join(lines) + "\n").encode()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake-model")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--mode", default="serve", choices=["serve", "silent", "huge"])
    p.add_argument("--samples", type=int, default=300000)
    args, _ = p.parse_known_args()
    model = args.served_model_name or args.model
    page = metrics_page(model, args.samples if args.mode == "huge" else 0)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            if args.mode == "silent":
                time.sleep(3600)
                return
            path = self.path.split("?")[0]
            if path == "/metrics":
                body, kind = page, "text/plain; version=0.0.4"
            elif path == "/version":
                body, kind = json.dumps({"version": "0.32.0"}).encode(), "application/json"
            elif path == "/v1/models":
                body = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()
                kind = "application/json"
            elif path in ("/health", "/ping"):
                body, kind = b"", "text/plain"
            else:
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = __import__("socket").AF_INET6 if ":" in args.host else __import__("socket").AF_INET

    server = Server((args.host, args.port), Handler)
    print(f"fake vLLM listening on {args.host}:{args.port} ({args.mode})", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
