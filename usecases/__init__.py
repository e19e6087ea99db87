"""What the CLI (run.py) and the monitor UI both do to keyrotor's state, over core's ports."""
