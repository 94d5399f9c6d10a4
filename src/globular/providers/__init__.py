"""Node providers: ``local`` (process groups on this machine), more through entry points."""
