"""The wire layer shared by the broker, its agents and its clients: the protocol buffers of
package ``gpubroker.v1``, their generated code, and the framing, conversions, ids, states and
transport settings every end uses alike. It imports none of the processes, numpy or torch."""
