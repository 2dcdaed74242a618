"""Online exit/offload policies: one family per module, a registry, Redis-backed state, hot swap."""
