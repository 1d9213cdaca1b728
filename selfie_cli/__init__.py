"""The `selfie` command line: run the stack, submit jobs and read their results."""
