"""Model families (one file each), the generic decoder they share, weight loading, the tiny model."""
