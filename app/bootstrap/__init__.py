"""Building the service from Settings, once, in the lifespan: parts.py assembles what
options.py, credentials.py and pipelines.py make."""
