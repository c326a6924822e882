"""The pipeline: parts composed per recipe, one prune flow for every structure, and one evaluate-and-write path."""
