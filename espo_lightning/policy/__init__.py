"""The policy model itself: loading it (without a full copy per rank under FSDP2), sharding it,
the attention kernel, the fused LM head and the log-probs/entropies computed from it, and export."""
