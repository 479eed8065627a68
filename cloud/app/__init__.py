"""The use cases, written once for every shell (Lambda handlers, local mode, the sidecar):
each a few explicit steps over `cloud.logic.ports`, with no I/O of their own."""
