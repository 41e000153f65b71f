// A stand-in for the predecessor (Node.js + socket.io, ticks from setInterval), used to
// measure it beside conductor and to test the probe's --socketio mode. It follows the
// predecessor's README: a tick every 16th note via setInterval with a millisecond interval,
// {time, bpm, count} with time = Date.now() at send, setBpm -> bpmChange to everyone.
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 3000);
let bpm = Number(process.env.BPM || 120);
let count = 0;
let timer = null;

const server = http.createServer((req, res) => {
  res.writeHead(req.url === "/healthz" ? 200 : 404, { "Content-Type": "text/plain" });
  res.end(req.url === "/healthz" ? "ok" : "not found");
});
const io = new Server(server, { cors: { origin: "*" } });

function start() {
  if (timer) clearInterval(timer);
  timer = setInterval(() => {
    io.emit("tick", { time: Date.now(), bpm, count });
    count++;
  }, 60000 / bpm / 4);
}

io.on("connection", (socket) => {
  socket.on("setBpm", (value) => {
    const next = Number(value);
    if (next >= 60 && next <= 200) {
      bpm = next;
      start();
      io.emit("bpmChange", bpm);
    }
  });
});

server.listen(port, "127.0.0.1", () => {
  console.log(`socket.io reference server on http://127.0.0.1:${port}/`);
  start();
});
process.on("SIGTERM", () => process.exit(0));
