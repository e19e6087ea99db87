"""run.py's commands: one module per command group, each with `command(args, settings) -> int`
(serve.py has serve, proxy and ui); parser.py holds every command, flag and help text, main.py
loads the settings, prepares storage and dispatches. run.py's docstring is the usage."""
