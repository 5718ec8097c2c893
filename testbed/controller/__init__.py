"""The controller: registration and heartbeats (registry), commands (protocol), partition deployment (deploy),
the control-plane server (server) and the API `testbed run` drives (api.Controller). See docs/controller.md.

Kept import-free on purpose: the device agent imports `protocol` and `deploy` (torch-free) without pulling in
the server, the metrics or the planner.
"""
