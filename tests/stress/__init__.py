"""Long-running stress tests (marked slow; still part of the suite)."""
