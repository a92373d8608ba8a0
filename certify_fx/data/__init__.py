"""Dataset builders reading standard formats from local paths (never downloading)."""
