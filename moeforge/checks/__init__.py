"""Checks that run before (or while) bytes are written, and the expectations `moeforge verify` tests against."""
