"""Registry examples of the GST family."""

__all__ = ["GST_EXAMPLES"]

GST_EXAMPLES = []
