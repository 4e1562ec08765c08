// Driver of the cross-language tests (internal/crosslang): one mode per
// run, results on stdout, one line each.
import { readFileSync } from "node:fs";

import { Client, QbridgeError } from "../qbridge.js";

const [mode, addr, ...args] = process.argv.slice(2);
const tls = process.env.XLANG_CA ? { ca: readFileSync(process.env.XLANG_CA) } : undefined;
const qb = new Client(addr, { timeoutMs: 5000, tls, token: process.env.XLANG_TOKEN });
const text = (b) => new TextDecoder().decode(b);

if (mode === "consume-ack") {
  // consume-ack QUEUE N: take N messages, ack each
  let n = 0;
  for await (const d of qb.consume(args[0], { maxInFlight: 4 })) {
    await d.ack();
    console.log(`acked ${d.id} ${d.attempt} ${text(d.payload)}`);
    if (++n >= Number(args[1])) break;
  }
} else if (mode === "publish") {
  // publish CHANNEL N
  for (let i = 0; i < Number(args[1]); i++) console.log(`receivers ${await qb.publish(args[0], `node-${i}`)}`);
} else if (mode === "enqueue-one") {
  // enqueue-one QUEUE: prints the id, or the error
  try {
    console.log(`id ${await qb.enqueue(args[0], "over tls")}`);
  } catch (e) {
    console.log(`error ${e.code}`);
  }
} else if (mode === "bad-queue") {
  try {
    await qb.enqueue("bad queue{}", "x");
  } catch (e) {
    console.log(`error ${e instanceof QbridgeError} ${e.code}`);
  }
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
