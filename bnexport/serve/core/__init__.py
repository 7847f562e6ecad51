"""The data plane's core: served models, batching, admission, statistics, model control.

Nothing here knows a transport. ``rest/`` (HTTP) and ``grpc/`` call the same objects, so a
rule (a limit, an error, a statistic) has one home and both protocols follow it.
"""
