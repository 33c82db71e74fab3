"""Loading and wrapping models: `load_model`, `HookedModel`, the adapters and the offline zoo."""
