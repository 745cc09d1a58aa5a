"""Self-supervised learning pieces: losses and multi-view transforms (lightly's split)."""
