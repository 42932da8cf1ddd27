"""Data sets: manifests, input checks, synthetic phantoms and lesion injection."""
