"""Training: augmentation, targets and loops (layer 3; may import io, never pipeline/viewer/cli)."""
