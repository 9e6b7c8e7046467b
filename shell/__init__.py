"""The `hublab>` shell."""
