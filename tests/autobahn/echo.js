// Plain ws:// echo backend for the Autobahn run (tests/autobahn/run.sh): the npm `ws`
// package, a compliant RFC 6455 implementation. No permessage-deflate (the proxy strips it),
// no limit on fragments or payload below the suite's sizes (9.x sends 16 MiB and 4 MiB in
// 64-byte fragments, beyond ws's default of 16384 fragments).
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 9002);
const wss = new WebSocketServer({
  host: '127.0.0.1',
  port,
  perMessageDeflate: false,
  maxFragments: 0, // 0 = unlimited
  maxPayload: 64 * 1024 * 1024,
  maxBufferedChunks: 0,
});
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => {});
});
wss.on('listening', () => console.log(`echo listening on ws://127.0.0.1:${port}`));
