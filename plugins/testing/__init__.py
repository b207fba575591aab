"""Test doubles (echo:, scripted:, det:) for tests and dry runs."""
