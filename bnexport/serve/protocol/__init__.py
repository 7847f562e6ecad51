"""The KServe v2 (Open Inference) protocol on the wire: types and codecs.

``types`` holds the REST data models, ``codec`` / ``binary`` the JSON and binary-tensor
encodings, ``grpc_codec`` the gRPC messages, ``tensor_limits`` the one shape check every
request tensor passes. Pure functions of bytes and arrays: no server state.
"""
