"""The task core of the broker: submitting, queueing, scheduling, dispatching to agents, leases.

Pure asyncio and domain objects: no grpc, no protobuf messages, no SQL (storage does that).
"""
