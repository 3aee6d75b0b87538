"""Conversions between the agent protocol's messages and the agent's dataclasses."""

from __future__ import annotations

from gpubroker.gpu_agent.model import Assignment, AttemptRef, Hello, ModelRef
from gpubroker.protos import agent_pb2
from gpubroker.protos.convert import meta_from_proto, params_from_proto
from gpubroker.protos.transport import CONTROL_PROTOCOL_VERSION

__all__ = ["assignment_from_proto", "hello_to_proto", "ref_from_proto", "ref_to_proto"]


def ref_from_proto(msg: agent_pb2.TaskAttempt) -> AttemptRef:
    """An attempt reference."""
    return AttemptRef(task_id=msg.task_id, number=msg.attempt)


def ref_to_proto(ref: AttemptRef) -> agent_pb2.TaskAttempt:
    """A ``TaskAttempt`` message."""
    return agent_pb2.TaskAttempt(task_id=ref.task_id, attempt=ref.number)


def assignment_from_proto(msg: agent_pb2.TaskAssignment) -> Assignment:
    """An assignment; its headers and params are checked later, by the attempt itself."""
    return Assignment(
        ref=AttemptRef(task_id=msg.task_id, number=msg.attempt),
        workload=msg.workload,
        inputs=tuple(meta_from_proto(h) for h in msg.inputs),
        params=params_from_proto(msg.params),
        timeout_s=msg.timeout_seconds if msg.timeout_seconds > 0 else None,
        inline_inputs=msg.inline_inputs if msg.inputs_inline else None,
        model=_model_from_proto(msg.model) if msg.HasField("model") else None,
    )


def _model_from_proto(msg: agent_pb2.ModelRef) -> ModelRef:
    return ModelRef(
        model_id=msg.model_id,
        size_bytes=msg.size_bytes,
        max_batch_size=max(msg.max_batch_size, 1),
        max_queue_delay_s=max(msg.max_queue_delay_seconds, 0.0),
    )


def hello_to_proto(hello: Hello) -> agent_pb2.AgentHello:
    """The first message of a control stream."""
    return agent_pb2.AgentHello(
        agent_id=hello.agent_id,
        gpu_type=hello.gpu_type,
        gpu_memory_bytes=hello.gpu_memory_bytes,
        slots=hello.slots,
        workloads=hello.workloads,
        version=hello.version,
        protocol=CONTROL_PROTOCOL_VERSION,
        prefetch=hello.prefetch,
        runs_models=hello.runs_models,
        models=hello.models,
        uptime_seconds=hello.uptime_s,
        broken_workloads=[
            agent_pb2.BrokenWorkload(name=name, error=error) for name, error in hello.broken
        ],
    )
