"""Scale-out: what lets many relay replicas serve one call (routing, ownership, pub/sub)."""
