"""Dataset checks a researcher runs before training, over an index built by mi-index:
duplicates, leakage between splits, outliers, export of a selection, and evaluation.

Each check reads the index read-only through `retrieval.curate.reader` (IndexStore's public
methods and plain read-only SQL) and compares vectors through `retrieval.curate.neighbours`
(FAISS kNN in batches, so memory stays bounded). Library code here returns plain dicts; the
command lines are in `retrieval.curate.cli`."""
