"""Engine adapters: they translate an engine's KV into streamkv calls; the core decides."""
