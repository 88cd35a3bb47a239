"""The handler's collaborators: the parts of a handler process that own their state."""
