// The fidelity tests' completions server on Node.js's own `http` module, written as Node servers
// are: `res.write` per SSE event (chunked), and `res.end(last)`, which Node sends as one `writev`
// of 5 iovecs (size line, data, CRLF, and the terminator). Same protocol as sse_app.py:
// POST /v1/completions {"model", "max_tokens", "stream", "delay_ms"}: an empty first event, then
// `max_tokens` events `delay_ms` apart, then `data: [DONE]`.
// Usage: node sse_node.js PORT
"use strict";
const http = require("http");

const port = parseInt(process.argv[2], 10);

function chunk(model, text) {
  const event = { id: "cmpl-test", object: "text_completion", model,
    choices: [{ index: 0, text, finish_reason: null }] };
  return "data: " + JSON.stringify(event) + "\n\n";
}

http.createServer((req, res) => {
  const body = [];
  req.on("data", (c) => body.push(c));
  req.on("end", () => {
    let r = {};
    try { r = JSON.parse(Buffer.concat(body).toString() || "{}"); } catch (e) { r = {}; }
    if (req.url !== "/v1/completions") {
      res.writeHead(404, { "content-type": "text/plain" });
      res.end("not found");
      return;
    }
    const model = String(r.model || "test-model");
    const tokens = Number.isInteger(r.max_tokens) ? r.max_tokens : 8;
    const delay = typeof r.delay_ms === "number" ? r.delay_ms : 2;
    if (r.stream) {
      res.writeHead(200, { "content-type": "text/event-stream; charset=utf-8" });
      res.write(chunk(model, ""));
      let i = 0;
      const next = () => {
        if (res.destroyed) return;
        if (i < tokens) {
          res.write(chunk(model, " t" + i));
          i += 1;
          setTimeout(next, delay);
        } else {
          res.end("data: [DONE]\n\n");
        }
      };
      setTimeout(next, delay);
    } else {
      setTimeout(() => {
        const out = JSON.stringify({ id: "cmpl-test", object: "text_completion", model,
          choices: [{ index: 0, text: " t".repeat(tokens) }] });
        res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(out) });
        res.end(out);
      }, delay * tokens);
    }
  });
}).listen(port, "127.0.0.1");
