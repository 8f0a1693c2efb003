"""Template tags and filters of the labeling pages."""
