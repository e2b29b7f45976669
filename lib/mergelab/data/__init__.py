"""Tasks and their data: generated images (procedural, scenes), image folders, the task and split types."""
