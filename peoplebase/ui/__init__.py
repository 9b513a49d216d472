"""The web page served under /ui/."""
