"""``make cost`` / ``python -m bench.cost``: the autoscaling policy's cost on simulated traces.

A discrete-event simulator (``sim``) with GCE's rules drives the real ``Autoscaler`` and the
baselines (``policies``) over named, seeded traces (``traces``) and prints, per trace, what each
policy pays for VMs against the GPU time it could bill. See docs/cost.md.
"""
