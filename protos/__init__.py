"""Protocol buffers of the GPU broker (package ``gpubroker.v1``) and their generated code."""
