"""Python client for a Shardwright server.

    from shardwright.api.client import Client
    with Client("127.0.0.1:50051", token="...") as c:
        job = c.submit(open("job.yaml").read())
        for token in c.generate_stream("chat", "Hello", max_tokens=16): ...

Errors arrive as `ShardwrightError` with the gRPC status code name and the server's message.
A token is sent without TLS only to a loopback address, unless `insecure=True` (ValueError).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf.json_format import MessageToDict

from shardwright.api.gen.shardwright.v1 import cluster_pb2, cluster_pb2_grpc, inference_pb2, inference_pb2_grpc
from shardwright.api.gen.shardwright.v1 import jobs_pb2, jobs_pb2_grpc
from shardwright.api.limits import RESUME_KEY


DEFAULT_PORT = 50051
TOKENS_PER_MESSAGE = 64  # GenerateStream: tokens the server may put in one message (see generate_stream)
# Codes that mean the request itself was wrong (the CLI exits 2 for these, 1 for the others).
BAD_INPUT = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE)


class ShardwrightError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code

    @property
    def bad_input(self) -> bool:
        return self.code in BAD_INPUT


def with_default_port(address: str) -> str:
    """`host` -> `host:50051` (also `[::1]`); addresses with a port or a scheme are kept."""
    if "://" in address or address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return address
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    if address.count(":") > 1:  # a bare IPv6 address
        return f"[{address}]:{DEFAULT_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_PORT}"


def _error(err: grpc.RpcError, address: str) -> ShardwrightError:
    details = err.details() or ""
    if err.code() == grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "dns" in details.lower()):
        details = (f"no Shardwright server answered at {address}: start one with `shardwright serve`, or point "
                   f"--address / SHARDWRIGHT_ADDRESS at a running one ({details.splitlines()[0] if details else ''})")
    return ShardwrightError(err.code(), details)


INT64_FIELDS = ("sequence", "step", "memory_total_bytes", "memory_free_bytes", "num_events")


def _dict(msg) -> dict:
    """A message as a dict; int64 fields as ints (the protobuf JSON mapping makes them strings)."""
    out = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _ints(out)


def _token_dict(token) -> dict:
    """A StreamedToken as the dict of a one-token GenerateStreamResponse (what `_dict` gives for it)."""
    out = {"token_id": token.token_id, "text": token.text, "finish_reason": "", "prompt_tokens": 0}
    if token.HasField("logprob"):
        out["logprob"] = _dict(token.logprob)
    return out


def _ints(value):
    if isinstance(value, dict):
        return {k: int(v) if k in INT64_FIELDS and isinstance(v, str) else _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def address_host(address: str) -> str:
    """The host of a gRPC target: 'h:p', '[v6]:p', 'dns:///h:p', 'ipv4:h:p'; '' for unix sockets."""
    if address.startswith(("unix:", "unix-abstract:")):
        return ""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(scheme):
            address = address[len(scheme):]
            break
    if address.startswith("["):
        return address[1:address.find("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def is_local(host: str) -> bool:
    """True for loopback addresses, 'localhost' and unix sockets (''): a token cannot leave the machine."""
    if host in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(address: str, token: str | None, tls: bool, insecure: bool) -> None:
    """Raise ValueError rather than send a bearer token in cleartext beyond this machine."""
    if token and not tls and not insecure and not is_local(address_host(address)):
        raise ValueError(f"refusing to send a token without TLS to {address}: give the server's CA certificate "
                         "with --ca-cert (ca_cert=), use a loopback address, or pass --insecure (insecure=True) to "
                         "send it in cleartext")


class Client:
    """Synchronous client; every method raises ShardwrightError on a non-OK status."""

    def __init__(self, address: str, *, token: str | None = None, ca_cert: Path | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None, timeout_s: float = 60.0,
                 insecure: bool = False) -> None:
        self.address = address = with_default_port(address)
        check_token_transport(address, token, tls=ca_cert is not None, insecure=insecure)
        self.timeout_s = timeout_s
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        if ca_cert is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_cert).read_bytes(),
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None)
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.cluster_stub = cluster_pb2_grpc.ClusterServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout_s: float | None = None):
        try:
            return method(request, metadata=self._metadata, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as err:
            raise _error(err, self.address) from None

    # ---- jobs
    def submit(self, spec_text: str, idempotency_key: str | None = None) -> dict:
        req = jobs_pb2.SubmitJobRequest(spec_yaml=spec_text, idempotency_key=idempotency_key or "")
        return _dict(self._call(self.jobs.SubmitJob, req))

    def get(self, job_id: str) -> dict:
        return _dict(self._call(self.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id)))

    def list(self, page_size: int = 50, page_token: str = "", state: str = "", kind: str = "") -> tuple[list[dict], str]:
        req = jobs_pb2.ListJobsRequest(page_size=page_size, page_token=page_token, state=state, kind=kind)
        resp = self._call(self.jobs.ListJobs, req)
        return [_dict(j) for j in resp.jobs], resp.next_page_token

    def cancel(self, job_id: str) -> dict:
        return _dict(self._call(self.jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id)))

    def watch(self, job_id: str, from_sequence: int = 0, timeout_s: float | None = None,
              on_resume: Callable[[int], None] | None = None) -> Iterator[dict]:
        """A job's events until it ends; reconnects, from the next sequence, when the server ends
        the stream for its maximum age (`serve --watch-max-age-s`), calling `on_resume(sequence)`
        (when given) before each reconnection."""
        while True:
            req = jobs_pb2.WatchJobRequest(job_id=job_id, from_sequence=from_sequence)
            try:
                for event in self.jobs.WatchJob(req, metadata=self._metadata, timeout=timeout_s):
                    from_sequence = int(event.sequence) + 1
                    yield _dict(event)
                return
            except grpc.RpcError as err:
                resume = dict(err.trailing_metadata() or ()).get(RESUME_KEY)
                if err.code() != grpc.StatusCode.UNAVAILABLE or resume is None:
                    raise _error(err, self.address) from None
                from_sequence = max(from_sequence, int(resume))
                if on_resume is not None:
                    on_resume(from_sequence)

    # ---- inference
    def _generate_request(self, deployment: str, prompt: str | list[int], **params) -> inference_pb2.GenerateRequest:
        req = inference_pb2.GenerateRequest(deployment=deployment, params=inference_pb2.SamplingParams(**params))
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        return req

    def generate(self, deployment: str, prompt: str | list[int], timeout_s: float | None = None, **params) -> dict:
        return _dict(self._call(self.inference.Generate, self._generate_request(deployment, prompt, **params), timeout_s))

    def generate_stream(self, deployment: str, prompt: str | list[int], timeout_s: float | None = None,
                        tokens_per_message: int = TOKENS_PER_MESSAGE, **params) -> Iterator[dict]:
        """Token messages as they arrive ({token_id, text, finish_reason, prompt_tokens[, logprob]}),
        one per token, then the last one (token_id -1, finish_reason set); closing the iterator early
        cancels the call, which cancels the request on the server.

        The server sends up to `tokens_per_message` tokens that are ready together in one gRPC message
        (1: one each, as servers and clients before `max_tokens_per_message` did); they are yielded
        here one by one all the same.
        """
        request = self._generate_request(deployment, prompt, **params)
        request.max_tokens_per_message = tokens_per_message
        call = self.inference.GenerateStream(request, metadata=self._metadata, timeout=timeout_s)
        try:
            for msg in call:
                if msg.tokens:
                    yield from (_token_dict(token) for token in msg.tokens)
                else:
                    out = _dict(msg)
                    del out["tokens"]
                    yield out
        except grpc.RpcError as err:
            raise _error(err, self.address) from None
        finally:
            call.cancel()

    # ---- cluster and health
    def cluster(self) -> dict:
        return _dict(self._call(self.cluster_stub.GetCluster, cluster_pb2.GetClusterRequest()))

    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... from the standard health service (no token needed)."""
        resp = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
