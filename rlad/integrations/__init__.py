"""Bridges from ``rlad`` to other training frameworks (each imported on its own: ``rlad.integrations.trl``
needs ``trl``, installed by the ``rlad[trl]`` extra)."""
