"""The gRPC servicer registration at the path Ray Serve configs name (kept for them; the generated
modules live in wire/, which the clients share).

serve_config.yaml, and every user config copied from it, lists
`serve.oip.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server` under
`grpc_options.grpc_servicer_functions`, and Ray's proxy imports it by that string: moving it
would break those configs. Nothing of ours imports this module.
"""
from wire.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server  # noqa: F401

__all__ = ["add_GRPCInferenceServiceServicer_to_server"]
