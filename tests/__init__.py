"""The test suite of skdeep."""
