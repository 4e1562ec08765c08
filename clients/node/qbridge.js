// A thin Node client for qbridge over the generated code in gen/ts, with
// @connectrpc/connect-node's gRPC transport (promises, async iterators).
//
//   import { Client } from "./clients/node/qbridge.js";
//   const qb = new Client("127.0.0.1:7070");
//   await qb.enqueue("jobs", "resize 42");
//   for await (const d of qb.consume("jobs", { maxInFlight: 8, signal })) {
//     await handle(d.payload);
//     await d.ack();
//   }
//
// Errors are QbridgeError with .code ("InvalidArgument", "NotFound",
// "FailedPrecondition", "ResourceExhausted", "Unavailable", ...) and .details.
// Ending a consume loop (break, or aborting its signal) cancels the stream:
// unacked messages go back to the queue at once.

import { create } from "@bufbuild/protobuf";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { NackAction, QueueService } from "../../gen/ts/qbridge/v1/queue_pb.js";

export class QbridgeError extends Error {
  constructor(code, details) {
    super(`${code}: ${details}`);
    this.name = "QbridgeError";
    this.code = code; // the status name, e.g. "InvalidArgument"
    this.details = details;
  }
}

function wrap(err) {
  if (err instanceof QbridgeError) return err;
  const ce = ConnectError.from(err);
  // The client's own cancellations never get here (a consume or subscribe
  // loop that is stopped just ends), so a Canceled is the transport giving
  // up on the connection (e.g. plaintext to a TLS server): Unavailable, as
  // the other gRPC clients report it.
  const code = ce.code === Code.Canceled ? "Unavailable" : Code[ce.code];
  return new QbridgeError(code, ce.rawMessage);
}

const enc = new TextEncoder();
const bytes = (p) => (typeof p === "string" ? enc.encode(p) : p);
const duration = (seconds) =>
  create(DurationSchema, { seconds: BigInt(Math.floor(seconds)), nanos: Math.round((seconds % 1) * 1e9) });

// Delivery is one message taken from a queue: ack() or nack() it once.
export class Delivery {
  constructor(d, client) {
    this.id = d.id;
    this.payload = d.payload;
    this.headers = d.headers;
    this.attempt = d.attempt;
    this.queue = d.queue;
    this.taskType = d.taskType;
    this.token = d.ackToken;
    this.client = client;
  }

  async ack() {
    try {
      await this.client.rpc.ack({ ackTokens: [this.token] }, this.client.callOptions());
    } catch (e) {
      throw wrap(e);
    }
  }

  // action: "requeue", "retry", "deadLetter" or "drop".
  async nack({ action = "requeue", error = "", retryDelay } = {}) {
    const actions = { requeue: NackAction.REQUEUE, retry: NackAction.RETRY, deadLetter: NackAction.DEAD_LETTER, drop: NackAction.DROP };
    const req = { ackTokens: [this.token], action: actions[action], error };
    if (retryDelay !== undefined) req.retryDelay = duration(retryDelay);
    try {
      await this.client.rpc.nack(req, this.client.callOptions());
    } catch (e) {
      throw wrap(e);
    }
  }
}

export class Client {
  // tls: true, or { ca, cert, key } (PEM strings or Buffers; cert and key
  // for mutual TLS) to connect with TLS; token is sent as
  // "authorization: Bearer <token>" with every call.
  constructor(address = "127.0.0.1:7070", { timeoutMs = 10000, tls, token } = {}) {
    const interceptors = [];
    if (token) {
      interceptors.push((next) => (req) => {
        req.header.set("authorization", `Bearer ${token}`);
        return next(req);
      });
    }
    const transport = createGrpcTransport({
      baseUrl: `${tls ? "https" : "http"}://${address}`,
      nodeOptions: tls && tls !== true ? { ca: tls.ca, cert: tls.cert, key: tls.key } : undefined,
      interceptors,
    });
    this.rpc = createClient(QueueService, transport);
    this.timeoutMs = timeoutMs;
  }

  callOptions() {
    return { timeoutMs: this.timeoutMs };
  }

  // enqueue appends a message and resolves to its id.
  async enqueue(queue, payload, { headers = {}, delay, dedupKey = "", taskType = "" } = {}) {
    const req = { queue, payload: bytes(payload), headers, dedupKey, taskType };
    if (delay !== undefined) req.delay = duration(delay);
    try {
      return (await this.rpc.enqueue(req, this.callOptions())).id;
    } catch (e) {
      throw wrap(e);
    }
  }

  // publish resolves to how many Redis subscriptions got the message.
  async publish(channel, payload) {
    try {
      return Number((await this.rpc.publish({ channel, payload: bytes(payload) }, this.callOptions())).receivers);
    } catch (e) {
      throw wrap(e);
    }
  }

  // consume yields Deliveries until the loop ends or signal aborts.
  async *consume(queue, { maxInFlight = 0, lease, signal } = {}) {
    const ac = new AbortController();
    const stop = () => ac.abort();
    signal?.addEventListener("abort", stop);
    const req = { queue, maxInFlight };
    if (lease !== undefined) req.leaseDuration = duration(lease);
    try {
      for await (const resp of this.rpc.consume(req, { signal: ac.signal })) {
        for (const d of resp.deliveries) yield new Delivery(d, this);
      }
    } catch (e) {
      if (ac.signal.aborted) return;
      throw wrap(e);
    } finally {
      signal?.removeEventListener("abort", stop);
      ac.abort(); // a loop that ends early cancels the stream
    }
  }

  // subscribe yields { channel, pattern, payload } of what is published
  // after the subscription is confirmed; onSubscribed runs at confirmation.
  async *subscribe(channels, { patterns = [], signal, onSubscribed } = {}) {
    const ac = new AbortController();
    const stop = () => ac.abort();
    signal?.addEventListener("abort", stop);
    try {
      for await (const resp of this.rpc.subscribe({ channels, patterns }, { signal: ac.signal })) {
        if (resp.event.case === "subscribed") onSubscribed?.();
        else if (resp.event.case === "message") yield resp.event.value;
      }
    } catch (e) {
      if (ac.signal.aborted) return;
      throw wrap(e);
    } finally {
      signal?.removeEventListener("abort", stop);
      ac.abort();
    }
  }
}
