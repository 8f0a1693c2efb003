"""Management commands: serving, demo data, import and export."""
