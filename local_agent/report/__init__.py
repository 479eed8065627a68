"""What the agent shows: the progress line, status and its HTML page."""
