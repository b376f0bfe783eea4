"""Client keys managed at run time: the per-worker directory the authenticator reads
(directory.py) and the create/list/rotate/revoke steps the admin API and the CLI share
(service.py). Persistence is app.store.client_keys; this package knows no web framework."""
