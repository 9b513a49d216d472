"""Static pages and helper servers for the browser SDK tests."""
