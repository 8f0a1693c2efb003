"""Management commands of the rewards app."""
