"""One study per notebook: the code a notebook calls, testable without papermill."""
