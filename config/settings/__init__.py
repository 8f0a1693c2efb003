"""Settings modules: `local` (embedded defaults), `production` (hardened), both built on `base`."""
