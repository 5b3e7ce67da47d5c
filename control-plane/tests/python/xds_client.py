#!/usr/bin/env python3
"""gRPC's built-in xDS client resolving `xds:///TARGET` through weir-cp.

Driven by control-plane/tests/integration/python_grpc.rs:

1. starts N gRPC backends on 127.0.0.1 (port 0), each answering /weir.test.Echo/Who with its
   own name, and prints `PORTS p1 p2 ...`;
2. waits for a line on stdin (the Rust side has applied an xDS config naming those ports);
3. opens `xds:///TARGET` (GRPC_XDS_BOOTSTRAP points at weir-cp), makes CALLS calls, and
   prints `RESULT {json}` with the number of calls each backend answered, then exits.

Only grpcio is needed (no generated code: generic handlers over raw bytes).
"""

import json
import sys
from concurrent import futures

import grpc


def backend(name):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

    def who(request, context):
        return name.encode()

    handler = grpc.method_handlers_generic_handler(
        "weir.test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def main():
    target = sys.argv[1]
    backends = int(sys.argv[2])
    calls = int(sys.argv[3])
    servers = [backend(f"b{i}") for i in range(backends)]
    print("PORTS " + " ".join(str(p) for _, p in servers), flush=True)
    if not sys.stdin.readline():
        return 2
    counts = {}
    errors = []
    with grpc.insecure_channel(f"xds:///{target}") as channel:
        who = channel.unary_unary("/weir.test.Echo/Who")
        # The first call waits for the xDS resources (bounded by the deadline).
        for i in range(calls):
            try:
                reply = who(b"", timeout=20 if i == 0 else 5, wait_for_ready=(i == 0))
                counts[reply.decode()] = counts.get(reply.decode(), 0) + 1
            except grpc.RpcError as e:  # pragma: no cover - reported to the Rust side
                errors.append(f"{e.code()}: {e.details()}")
                if len(errors) > 3:
                    break
    print("RESULT " + json.dumps({"counts": counts, "errors": errors}), flush=True)
    for s, _ in servers:
        s.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
