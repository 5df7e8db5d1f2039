"""Accuracy-targeted search: the smallest (or fastest) model that still meets the user's accuracy, found for them.

``python -m pipelines.search`` (``__main__``) reads a recipe's ``search`` section (``spec``), makes
one candidate recipe per point of its space (``space``), and trains them by successive halving
(``strategy``): each candidate is an ordinary run of ``pipelines.run`` whose stages are cached, so
a search resumes where it stopped and candidates share every stage they have in common (the
teacher, a distilled student that only its sparsity or quantization variant tells apart).
``report`` writes the ``search/`` folder.
"""
