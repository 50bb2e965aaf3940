#!/usr/bin/env python3
"""A gRPC origin on a plain-text HTTP/2 port (h2c), with `grpcio` and no generated code.

    grpc_origin.py [PORT]

Prints `listening 127.0.0.1:PORT`. Service pkg.Svc, messages as raw bytes:
  Echo  answers the request message, with trailing metadata x-echo-trailer: yes
  Fail  fails with NOT_FOUND and the message "no such thing"
"""

import sys
from concurrent import futures

import grpc


def echo(request, context):
    context.set_trailing_metadata((("x-echo-trailer", "yes"),))
    return request


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    handler = grpc.method_handlers_generic_handler(
        "pkg.Svc",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening 127.0.0.1:{bound}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
