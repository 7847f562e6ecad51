"""The data plane's core: state, data plane, served models, batching, admission, auth.

Nothing here knows a transport. ``rest/`` (HTTP) and ``grpc/`` call the same objects
(:class:`~bnexport.serve.core.dataplane.DataPlane` over one
:class:`~bnexport.serve.core.state.ServerState`), so a rule (a limit, an error, a
statistic, the token check) has one home and both protocols follow it.
"""
