"""After a run: its manifest, its event, and where events go."""
