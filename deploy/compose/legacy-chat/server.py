#!/usr/bin/env python3
"""A deliberately naive legacy chat backend: plaintext ws://, no TLS, no auth, no origin
check, no limits. Every text message is broadcast to every connected client, prefixed with
the user name that wsgate forwards in the X-Auth-User header (from the token's `sub`).

It stands for the kind of server wsgate is meant to protect; never expose it directly.

  GET /        a tiny chat page (served through wsgate when [backend] http = "proxy")
  any path     WebSocket upgrade -> join the chat room

Environment: HOST (default 0.0.0.0), PORT (default 8080).
"""

import asyncio
import logging
import os
import signal

from websockets.asyncio.server import broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

CLIENTS = set()

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>legacy chat behind wsgate</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}#log{border:1px solid #ccc;
height:20em;overflow-y:auto;padding:.5em;white-space:pre-wrap}input{width:100%;box-sizing:border-box}
</style></head><body>
<h1>legacy chat</h1>
<p>Paste a token (<code>docker compose run --rm wsgate token --secret-env WSGATE_JWT_SECRET
--sub alice --aud chat</code>), then connect. The token travels as the WebSocket subprotocol
pair <code>access_token, &lt;jwt&gt;</code>; wsgate checks it and strips it.</p>
<p><input id="token" placeholder="JWT" autocomplete="off"></p>
<p><button id="connect">connect</button> <span id="state">disconnected</span></p>
<div id="log"></div>
<p><input id="msg" placeholder="message, Enter to send" disabled></p>
<script>
const $ = (id) => document.getElementById(id);
let ws;
function log(text) { const d = document.createElement("div"); d.textContent = text;
  $("log").appendChild(d); $("log").scrollTop = $("log").scrollHeight; }
$("connect").onclick = () => {
  if (ws) ws.close();
  ws = new WebSocket(`wss://${location.host}/ws`, ["access_token", $("token").value.trim()]);
  ws.onopen = () => { $("state").textContent = "connected"; $("msg").disabled = false; };
  ws.onmessage = (e) => log(e.data);
  ws.onclose = (e) => { $("state").textContent = `closed ${e.code} ${e.reason}`;
    $("msg").disabled = true; };
};
$("msg").onkeydown = (e) => { if (e.key === "Enter" && ws) { ws.send($("msg").value);
  $("msg").value = ""; } };
</script></body></html>
""".encode()


async def process_request(connection, request):
    """Plain HTTP (not an upgrade): serve the page, or 404."""
    if "websocket" in request.headers.get("Upgrade", "").lower():
        return None
    if request.path in ("/", "/index.html"):
        headers = Headers(
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(PAGE))),
                ("Cache-Control", "no-store"),
            ]
        )
        return Response(200, "OK", headers, PAGE)
    return Response(404, "Not Found", Headers([("Content-Length", "10")]), b"not found\n")


async def chat(ws):
    user = ws.request.headers.get("X-Auth-User", "anonymous")
    peer = ws.request.headers.get("X-Real-IP", "?")
    logging.info("join user=%s client_ip=%s path=%s", user, peer, ws.request.path)
    CLIENTS.add(ws)
    broadcast(CLIENTS, f"* {user} joined")
    try:
        async for message in ws:
            if isinstance(message, str):
                broadcast(CLIENTS, f"{user}: {message}")
    finally:
        CLIENTS.discard(ws)
        broadcast(CLIENTS, f"* {user} left")
        logging.info("leave user=%s code=%s", user, ws.close_code)


async def main():
    host = os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("PORT", "8080"))
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(chat, host, port, process_request=process_request, max_size=1 << 20):
        logging.info("legacy chat listening on ws://%s:%d", host, port)
        await stop


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main())
