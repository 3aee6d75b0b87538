"""Scaling: the autoscaling policy, the loop that carries it out, and the providers of machines."""
