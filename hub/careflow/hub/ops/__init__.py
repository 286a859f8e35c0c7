"""The operations agent's parts: runbooks, the action registry, gateway commands (issue 14)."""
