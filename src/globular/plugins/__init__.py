"""Plugins: code that runs on a cluster's nodes when it starts, grows, shrinks and stops."""
