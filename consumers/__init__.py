"""The stage workers (device, edge, cloud) and the feedback path back to the policy."""
