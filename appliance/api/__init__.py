"""The analyst REST API (``branchguard serve``): a Starlette app built by
:func:`appliance.api.app.create_app`. One module per concept: the request plumbing
(endpoint.py), errors, query parameters and bodies, auth, rate limits, the response cache,
metrics, and one module of routes per resource."""
