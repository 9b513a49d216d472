"""The read side: the Engage query API."""
