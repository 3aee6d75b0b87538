"""The gRPC edge of the broker: the client-facing and agent-facing servicers and their converters.

Servicers decode requests, call the task core, and encode answers; domain errors become status
codes here and nowhere else.
"""
