"""The Django app of bridge: devices, grants, audit and persisted history."""
