"""The on-disk example index: hnswlib graph + row-aligned metadata + manifest."""
