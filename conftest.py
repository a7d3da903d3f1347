"""Makes pytest put the bundle root on sys.path, so tests can import ``scripts.*``."""
