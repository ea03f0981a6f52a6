"""engine subsystem."""
