"""One module per sub-command; each defines a click command called `command` and imports heavy
libraries inside the command function, never at module level (keeps start-up fast)."""
