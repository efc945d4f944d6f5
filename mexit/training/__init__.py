"""Training: exit heads on a frozen base."""
