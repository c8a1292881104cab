"""The standalone Django site bridge serves when no ``--settings`` is given."""
