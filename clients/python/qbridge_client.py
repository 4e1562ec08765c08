"""A thin Python client for qbridge over the generated gRPC code (gen/python).

    from qbridge_client import Client

    with Client("127.0.0.1:7070") as qb:
        qb.enqueue("jobs", b"resize 42")
        with qb.consume("jobs", max_in_flight=8) as deliveries:
            for d in deliveries:
                handle(d.payload)
                d.ack()

Errors are raised as QbridgeError subclasses named after the gRPC status
(InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted,
Unavailable, ...), each with .code and .details. Needs python3-grpcio and
python3-protobuf, and gen/python on sys.path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Union

import grpc
from google.protobuf import duration_pb2

from qbridge.v1 import queue_pb2 as pb
from qbridge.v1 import queue_pb2_grpc as rpc

Payload = Union[bytes, str]


class QbridgeError(Exception):
    """A failed call: .code is the grpc.StatusCode, .details the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(QbridgeError): ...
class NotFound(QbridgeError): ...
class FailedPrecondition(QbridgeError): ...
class ResourceExhausted(QbridgeError): ...
class Unavailable(QbridgeError): ...
class DeadlineExceeded(QbridgeError): ...
class Cancelled(QbridgeError): ...
class Unauthenticated(QbridgeError): ...
class PermissionDenied(QbridgeError): ...


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def _error(e: grpc.RpcError) -> QbridgeError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return _BY_CODE.get(code, QbridgeError)(code, details or "")


def _bytes(p: Payload) -> bytes:
    return p.encode() if isinstance(p, str) else bytes(p)


def _duration(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


@dataclass
class Delivery:
    """One message taken from a queue; ack() or nack() it once."""

    id: str
    payload: bytes
    headers: Mapping[str, str]
    attempt: int
    queue: str
    task_type: str
    _token: str = field(repr=False)
    _client: "Client" = field(repr=False)

    def ack(self, result: Optional[bytes] = None) -> None:
        req = pb.AckRequest(ack_tokens=[self._token])
        if result is not None:
            req.results[self._token] = result
        self._client._call(self._client._stub.Ack, req)

    def nack(self, action: str = "requeue", error: str = "", retry_delay: Optional[float] = None) -> None:
        """action: "requeue", "retry", "dead_letter" or "drop"."""
        req = pb.NackRequest(
            ack_tokens=[self._token],
            action=pb.NackAction.Value("NACK_ACTION_" + action.upper()),
            error=error,
        )
        if retry_delay is not None:
            req.retry_delay.CopyFrom(_duration(retry_delay))
        self._client._call(self._client._stub.Nack, req)


class _Stream:
    """An open server stream: iterate it; leaving the with block (or close())
    cancels it, and a Consume stream's unacked messages go back at once."""

    def __init__(self, call):
        self._call = call

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._call.cancel()


class Consumer(_Stream):
    def __init__(self, call, client: "Client"):
        super().__init__(call)
        self._client = client

    def __iter__(self) -> Iterator[Delivery]:
        try:
            for resp in self._call:
                for d in resp.deliveries:
                    yield Delivery(d.id, d.payload, dict(d.headers), d.attempt, d.queue, d.task_type, d.ack_token, self._client)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return
            raise _error(e) from None


class Subscription(_Stream):
    """Iterates (channel, payload) of what is published after it is
    confirmed; iterating waits for the confirmation first."""

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        try:
            for resp in self._call:
                if resp.HasField("message"):
                    yield resp.message.channel, resp.message.payload
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                return
            raise _error(e) from None

    def wait_subscribed(self) -> None:
        """Blocks until the server confirms the subscription."""
        try:
            first = next(iter(self._call))
        except grpc.RpcError as e:
            raise _error(e) from None
        if not first.HasField("subscribed"):
            raise QbridgeError(grpc.StatusCode.INTERNAL, "first message was not the confirmation")


class Client:
    """A connection to qbridge. Use it as a context manager, or close() it."""

    def __init__(self, target: str = "127.0.0.1:7070", *, timeout: float = 10.0,
                 tls: bool = False, ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None,
                 token: Optional[str] = None, channel: Optional[grpc.Channel] = None):
        """tls (implied by ca_file or cert_file) verifies the server with the
        system's CAs or ca_file; cert_file and key_file add a client
        certificate (mutual TLS); token is sent as "authorization: Bearer
        <token>" with every call."""
        if channel is None:
            if tls or ca_file or cert_file:
                def read(path: Optional[str]) -> Optional[bytes]:
                    if path is None:
                        return None
                    with open(path, "rb") as f:
                        return f.read()
                creds = grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
                channel = grpc.secure_channel(target, creds)
            else:
                channel = grpc.insecure_channel(target)
        self._channel = channel
        self._stub = rpc.QueueServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = (("authorization", "Bearer " + token),) if token else None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, req):
        try:
            return method(req, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def enqueue(self, queue: str, payload: Payload, *, headers: Optional[Mapping[str, str]] = None,
                delay: Optional[float] = None, dedup_key: str = "", task_type: str = "",
                keep_result: bool = False) -> str:
        """Appends a message to queue and returns its id."""
        req = pb.EnqueueRequest(queue=queue, payload=_bytes(payload), headers=dict(headers or {}),
                                dedup_key=dedup_key, task_type=task_type, keep_result=keep_result)
        if delay is not None:
            req.delay.CopyFrom(_duration(delay))
        return self._call(self._stub.Enqueue, req).id

    def publish(self, channel: str, payload: Payload) -> int:
        """Publishes to channel; returns how many Redis subscriptions got it."""
        return self._call(self._stub.Publish, pb.PublishRequest(channel=channel, payload=_bytes(payload))).receivers

    def consume(self, queue: str, *, max_in_flight: int = 0, lease: Optional[float] = None) -> Consumer:
        req = pb.ConsumeRequest(queue=queue, max_in_flight=max_in_flight)
        if lease is not None:
            req.lease_duration.CopyFrom(_duration(lease))
        return Consumer(self._stub.Consume(req, metadata=self._metadata), self)

    def subscribe(self, *channels: str, patterns: tuple[str, ...] = ()) -> Subscription:
        return Subscription(self._stub.Subscribe(pb.SubscribeRequest(channels=list(channels), patterns=list(patterns)), metadata=self._metadata))
