"""A tiny OpenAI-style completions server for inferwatch's fidelity tests.

Served by uvicorn with uvloop and httptools, the stack vLLM's API server uses, so the socket
calls are vLLM's: `read` for requests, one `write` per SSE event, then `0\\r\\n\\r\\n`.

POST /v1/completions with a JSON body:
  {"model": str, "prompt": str, "max_tokens": int, "stream": bool, "delay_ms": float}
Streams an empty first event (no content, like vLLM's first chat chunk), then `max_tokens`
events each carrying one token `delay_ms` apart, then `data: [DONE]`.

With SSE_STALL_MS="LOW,HIGH" in the environment, the event loop is blocked for LOW..HIGH ms
at random moments (a busy API server: tokenising, serialising), so requests wait in their
sockets, and new connections in the accept queue, before the server reads them.
"""
import asyncio
import json
import os
import random
import time

_STALL = os.environ.get("SSE_STALL_MS")
_stalling = None


async def _stall_forever(low, high):
    while True:
        await asyncio.sleep(random.uniform(0.005, 0.04))
        time.sleep(random.uniform(low, high) / 1000.0)  # blocks the whole loop on purpose


async def read_body(receive):
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def chunk(model, text):
    event = {"id": "cmpl-test", "object": "text_completion", "model": model,
             "choices": [{"index": 0, "text": text, "finish_reason": None}]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def app(scope, receive, send):
    global _stalling
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if _STALL:
                    low, high = (float(v) for v in _STALL.split(","))
                    _stalling = asyncio.get_running_loop().create_task(_stall_forever(low, high))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = await read_body(receive)
    if body is None:
        return
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        req = {}
    if scope["path"] != "/v1/completions":
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"not found"})
        return
    model = str(req.get("model", "test-model"))
    tokens = int(req.get("max_tokens", 8))
    delay = float(req.get("delay_ms", 2)) / 1000.0
    if req.get("stream"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": chunk(model, ""), "more_body": True})
        for i in range(tokens):
            await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": chunk(model, f" t{i}"), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        await asyncio.sleep(delay * tokens)
        out = json.dumps({"id": "cmpl-test", "object": "text_completion", "model": model,
                          "choices": [{"index": 0, "text": " t" * tokens}]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
