"""Graph passes and the factorizations they run."""
