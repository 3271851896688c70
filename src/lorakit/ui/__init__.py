"""Terminal output shared by every command: progress lines and displays, charts, number formatting and tables.

It sits below `train/`, `serve/`, `export/` and `cli/` and imports nothing else of lorakit, so a writer or the
server shows progress without depending on the training package."""
