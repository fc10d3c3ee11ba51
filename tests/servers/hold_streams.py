"""Holds many streamed responses open at once, for measuring the agent's memory per connection.

`python3 hold_streams.py PORT`: for every connection, reads one HTTP request head (and its
Content-Length body), answers with a chunked `text/event-stream` head and one SSE event, then
holds the stream open (mid-request, as a long generation would) until the client closes it.
Plain asyncio, one `write` per piece, like vLLM's API server; a few KiB per connection.
"""
import asyncio
import resource
import sys

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"id":"cmpl-hold","choices":[{"index":0,"text":"x"}]}\n\n'


async def serve(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await reader.readexactly(length)
        writer.write(HEAD)
        writer.write(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
        await writer.drain()
        await reader.read()  # until the client closes
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
