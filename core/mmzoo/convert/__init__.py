"""Weight conversion itself: declarative HF <-> mm mappings, and tensor/pipeline split and merge."""
