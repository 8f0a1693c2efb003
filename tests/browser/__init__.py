"""End-to-end tests that drive the pages in a real headless Chromium."""
