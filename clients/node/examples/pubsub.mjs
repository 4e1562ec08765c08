// A publisher and a subscriber over qbridge pub/sub.
//
//   node pubsub.mjs subscribe news 3     # prints the next 3 messages on "news"
//   node pubsub.mjs publish news hello   # publishes, prints how many got it
import { Client } from "../qbridge.js";

const [mode, channel, arg] = process.argv.slice(2);
const qb = new Client(process.env.QBRIDGE_ADDR ?? "127.0.0.1:7070");
if (mode === "publish") {
  console.log(`receivers ${await qb.publish(channel, arg)}`);
} else if (mode === "subscribe") {
  let n = 0;
  for await (const m of qb.subscribe([channel], { onSubscribed: () => console.log("subscribed") })) {
    console.log(`${m.channel} ${new TextDecoder().decode(m.payload)}`);
    if (++n >= Number(arg ?? 1)) break;
  }
} else {
  console.error("usage: pubsub.mjs publish|subscribe CHANNEL ARG");
  process.exit(2);
}
