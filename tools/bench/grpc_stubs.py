"""What the benchmark scripts share to reach sdserve's services: a free
localhost port, and Python stubs generated at run time from our proto."""

import importlib
import socket
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parents[2] / "proto"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stubs(out, service):
    """The messages and stubs of `service` (e.g. "generation",
    "text_encoder"), generated into the folder `out` by grpc_tools."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO)) for p in sorted((PROTO / "sd" / "v1").glob("*.proto"))]
    assert protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", *files]) == 0
    sys.path.insert(0, str(out))
    return (importlib.import_module(f"sd.v1.{service}_pb2"),
            importlib.import_module(f"sd.v1.{service}_pb2_grpc"))
