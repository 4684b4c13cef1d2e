"""The alert gateway: webhook bodies from monitoring tools -> normalised `Alert`s -> routes.

Pure layer (no Prefect): parsing (`gateway.sources`), verification (`gateway.signatures`),
routing (`gateway.routing`) and the HTTP surface (`gateway.app`).
"""
